-- The semantic-search example's table (examples/search/src/Store.php creates it when missing).
CREATE TABLE IF NOT EXISTS docs (
    id bigserial PRIMARY KEY,
    package text NOT NULL UNIQUE,
    summary text NOT NULL,
    section text NOT NULL DEFAULT '',
    -- all-MiniLM-L6-v2's unit vector: 384 little-endian float32 values (1,536 bytes), as
    -- TensorBridge returns it; the search-index model holds the same vectors in memory.
    embedding bytea NOT NULL CHECK (length(embedding) = 1536)
);
