"""Store backends: where objects are shared. ``open_store`` picks one from a configuration.

The S3 backend (and boto3 with it) is imported only when a store on S3 is opened."""

from __future__ import annotations

from ..config import Config
from .base import (
    Level,
    ObjectInfo,
    Progress,
    Store,
    StoredVersion,
    WriteUnconfirmedError,
    bucket_and_prefix,
    describe_s3,
)

__all__ = [
    "Level",
    "ObjectInfo",
    "Progress",
    "Store",
    "StoredVersion",
    "WriteUnconfirmedError",
    "describe_store",
    "open_store",
]


def open_store(config: Config) -> Store:
    if config.service == "local":
        from .local import LocalStore

        return LocalStore(config.storage_name)
    if config.service == "gcs":
        from .gcs import GCSStore  # the SDKs are optional extras, imported only when used

        return GCSStore.from_config(config)
    if config.service == "azure":
        from .azure import AzureStore

        return AzureStore.from_config(config)
    from .s3 import S3Store

    return S3Store.from_config(config)


def describe_store(config: Config) -> str:
    """What ``open_store(config).describe()`` says, without opening the store: no client is
    made and boto3 is not imported."""
    if config.service == "local":
        from .local import LocalStore

        return LocalStore(config.storage_name).describe()  # a path: nothing is opened
    if config.service == "gcs":
        from .gcs import describe_gcs  # the module imports no SDK: only GCSStore does

        return describe_gcs(config)
    if config.service == "azure":
        from .azure import describe_azure

        return describe_azure(config)
    return describe_s3(*bucket_and_prefix(config.storage_name))
