"""Store backends: where objects are shared. ``open_store`` picks one from a configuration.

The S3 backend (and boto3 with it) is imported only when a store on S3 is opened."""

from __future__ import annotations

from ..config import Config
from .base import (
    Level,
    ObjectInfo,
    Progress,
    Store,
    WriteUnconfirmedError,
    describe_s3,
    s3_location,
)

__all__ = [
    "Level",
    "ObjectInfo",
    "Progress",
    "Store",
    "WriteUnconfirmedError",
    "describe_store",
    "open_store",
]


def open_store(config: Config) -> Store:
    if config.service == "local":
        from .local import LocalStore

        return LocalStore(config.storage_name)
    from .s3 import S3Store

    return S3Store.from_config(config)


def describe_store(config: Config) -> str:
    """What ``open_store(config).describe()`` says, without opening the store: no client is
    made and boto3 is not imported."""
    if config.service == "local":
        from .local import LocalStore

        return LocalStore(config.storage_name).describe()  # a path: nothing is opened
    return describe_s3(*s3_location(config.storage_name))
