"""Builds the compiled frame parser and event loop (``tensorbridge._tbcore``); metadata is in
pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "tensorbridge._tbcore",
    sources=["csrc/tb_frame.c", "csrc/tb_conn.c", "csrc/tb_loop.c", "csrc/tb_pyloop.c",
             "csrc/tb_module.c"],
    depends=["csrc/tb_frame.h", "csrc/tb_conn.h", "csrc/tb_loop.h"],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
)])
