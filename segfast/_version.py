"""segfast's version: one place, read by the package face, engine files and exports."""

from __future__ import annotations

__version__ = "0.1.0"
