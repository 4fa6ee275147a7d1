"""Logging set-up, done once by each entry point (`bcc`, `bcc-desk`, `bcc-train`, the int8 build's
child process), never by the library modules themselves."""

from __future__ import annotations

import logging

DEVELOPER_NOISE = (
    # Inductor's C++ toolchain probe warns about a missing CUDA runtime on CPU-only machines.
    "torch.utils.cpp_extension",
    # torch notes a deprecation of one of torchao's enums at import.
    "torch.utils._pytree",
)
"""Loggers of the libraries below us whose warnings speak to their developers, not to a lab."""


def quiet_developer_noise() -> None:
    for name in DEVELOPER_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
