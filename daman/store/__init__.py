"""Store backends: where objects are shared. ``open_store`` picks one from a configuration."""

from __future__ import annotations

from ..config import Config
from .base import Level, ObjectInfo, Progress, Store, WriteUnconfirmedError

__all__ = ["Level", "ObjectInfo", "Progress", "Store", "WriteUnconfirmedError", "open_store"]


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
