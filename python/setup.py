"""Builds the compiled frame parser (``tensorbridge._tbcore``); metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "tensorbridge._tbcore",
    sources=["csrc/tb_frame.c", "csrc/tb_module.c"],
    depends=["csrc/tb_frame.h"],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
)])
