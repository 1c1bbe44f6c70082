"""Models that ship with tensorbridge: the ``digits`` demo model and small test models."""
