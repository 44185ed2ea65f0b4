"""The module-level API (``import daman as dm``) and ``dm.configure``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import daman as dm


def configure_local(tmp_path: Path, **fields) -> dm.Config:
    return dm.configure(
        storage_name=str(tmp_path / "store"),
        service="local",
        local_dir=str(tmp_path / "cache"),
        progress=False,
        **fields,
    )


def test_using_daman_before_configuring_says_what_to_run() -> None:
    for call in (lambda: dm.push(1, "k"), lambda: dm.pull("k"), dm.usage, lambda: dm.ls()):
        with pytest.raises(dm.NotConfiguredError, match="dm_configure"):
            call()


def test_configure_saves_and_the_module_functions_use_it(tmp_path: Path, daman_home: Path):
    config = configure_local(tmp_path, allocated_space="10MB")
    saved = json.loads((daman_home / "config.json").read_text())
    assert saved["storage_name"] == str(tmp_path / "store") and saved["allocated_space"] == 10**7
    assert (tmp_path / "store").is_dir()  # the local store folder is created on configure
    assert dm.current_config() == config

    dm.push(np.arange(5), "team/a", meta={"m": 1})
    obj, meta = dm.pull("team/a")
    np.testing.assert_array_equal(obj, np.arange(5))
    assert meta == {"m": 1}
    assert dm.exists("team/a") and not dm.exists("team/b")
    assert [item.key for item in dm.ls("team/")] == ["team/a"]
    assert dm.info("team/a").meta == {"m": 1}
    assert dm.usage().allocated == 10**7 and len(dm.usage().entries) == 1
    dm.set_persist("team/a", True)
    assert dm.usage().entries[0].persist
    assert dm.fetch("team/a").persist
    dm.delete("team/a", remote=True)
    assert not dm.exists("team/a") and dm.usage().entries == []


def test_configure_updates_only_the_fields_given(tmp_path: Path) -> None:
    configure_local(tmp_path)
    config = dm.configure(allocated_space="1GiB")
    assert config.allocated_space == 2**30 and config.service == "local"
    assert dm.get_manager().cache.allocated_space == 2**30  # the default manager was rebuilt


def test_configure_without_saving_uses_a_store_for_this_process_only(
    tmp_path: Path, daman_home: Path
) -> None:
    team = configure_local(tmp_path / "team", signing_key="team-secret", allocated_space="1GiB")
    saved = (daman_home / "config.json").read_bytes()
    demo = dm.configure(
        storage_name=str(tmp_path / "demo" / "store"),
        service="local",
        local_dir=str(tmp_path / "demo" / "cache"),
        save=False,
    )
    assert (daman_home / "config.json").read_bytes() == saved  # byte for byte
    # Nothing of the saved configuration leaks in: not its signing key, cache or allocation.
    assert demo.signing_key is None and demo.allocated_space is None
    assert dm.current_config() == demo and dm.get_manager().config == demo
    dm.push(1, "k")
    assert (tmp_path / "demo" / "store" / "k.daman").exists()
    assert not (tmp_path / "team" / "store" / "k.daman").exists()
    # A second call builds on the unsaved one, still without saving.
    assert dm.configure(allocated_space="5MB", save=False).storage_name == demo.storage_name
    assert dm.get_manager().cache.allocated_space == 5 * 10**6
    assert (daman_home / "config.json").read_bytes() == saved
    dm.reset()  # back to the saved configuration
    assert dm.current_config() == team and not dm.exists("k")


def test_configure_without_saving_writes_no_file(tmp_path: Path, daman_home: Path) -> None:
    with pytest.raises(dm.ConfigError, match="storage_name is required"):
        dm.configure(service="local", save=False)
    dm.configure(storage_name=str(tmp_path / "store"), service="local", save=False)
    dm.push(1, "k")
    assert dm.pull("k")[0] == 1
    assert not (daman_home / "config.json").exists()
    dm.reset()
    with pytest.raises(dm.NotConfiguredError):
        dm.get_manager()


def test_configure_needs_a_storage_name_the_first_time() -> None:
    with pytest.raises(dm.ConfigError, match="storage_name is required"):
        dm.configure(service="local")


def test_configure_rejects_bad_values_and_saves_nothing(tmp_path: Path, daman_home: Path):
    with pytest.raises(dm.ConfigError, match="allocated_space must be"):
        configure_local(tmp_path, allocated_space="a lot")
    with pytest.raises(dm.ConfigError, match="service must be one of aws, local"):
        dm.configure(storage_name="b", service="dropbox")
    assert not (daman_home / "config.json").exists()


def test_configure_checks_that_the_bucket_exists(s3_endpoint: str, daman_home: Path) -> None:
    with pytest.raises(dm.StorageNotFoundError, match="does not exist"):
        dm.configure(storage_name="no-such-bucket-xyz", service="aws", endpoint_url=s3_endpoint)
    assert not (daman_home / "config.json").exists()
    config = dm.configure(
        storage_name="no-such-bucket-xyz", service="aws", endpoint_url=s3_endpoint, check=False
    )
    assert config.storage_name == "no-such-bucket-xyz"
    with pytest.raises(dm.StorageNotFoundError, match="dm_configure"):
        dm.push(1, "k")


def test_s3_round_trip_through_the_module_api(s3_endpoint: str, bucket: str, tmp_path: Path):
    dm.configure(
        storage_name=bucket, service="aws", endpoint_url=s3_endpoint, local_dir=str(tmp_path / "c")
    )
    dm.push({"x": 1}, "a/b")
    assert dm.pull("a/b", force=True) == ({"x": 1}, None)


@pytest.mark.parametrize("mode", ["when_required", "when_supported"])
def test_checksum_modes_work_against_the_server(
    s3_endpoint: str, bucket: str, tmp_path: Path, mode: str
) -> None:
    config = dm.configure(
        storage_name=bucket,
        service="aws",
        endpoint_url=s3_endpoint,
        local_dir=str(tmp_path / "c"),
        checksums=mode,
        progress=False,
    )
    manager = dm.get_manager()
    assert manager.store.client.meta.config.request_checksum_calculation == mode
    big = np.random.default_rng(0).random(1_500_000)  # 12 MB: the multipart path too
    dm.push(big, "big")
    dm.push("small", "small")
    manager.cache.clear()
    np.testing.assert_array_equal(dm.pull("big")[0], big)
    assert dm.pull("small")[0] == "small"
    assert config.checksums == mode


def test_missing_credentials_give_a_clear_error(
    s3_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(dm.CredentialsError, match="dm_aws") as info:
        dm.configure(storage_name=bucket, service="aws", endpoint_url=s3_endpoint)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_standard_endpoint_variables_are_honoured(
    s3_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, s3_endpoint)
    config = dm.configure(storage_name=bucket, service="aws", local_dir=str(tmp_path / "c"))
    assert config.endpoint_url is None
    dm.push([1], "via-env")
    assert dm.get_manager().store.client.meta.endpoint_url == s3_endpoint
    assert dm.pull("via-env", force=True) == ([1], None)


def test_unknown_aws_profile_is_a_credentials_error(
    s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(dm.CredentialsError, match="dm_aws --profile"):
        dm.configure(storage_name=bucket, service="aws", endpoint_url=s3_endpoint)


@pytest.mark.parametrize("url", ["localhost:9000", "ftp://host", "minio"])
def test_malformed_endpoint_url_is_a_config_error(url: str) -> None:
    with pytest.raises(dm.ConfigError, match="endpoint_url"):
        dm.configure(storage_name="bucket", service="aws", endpoint_url=url)


def test_relative_local_dir_is_saved_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    config = dm.configure(storage_name=str(tmp_path / "store"), service="local", local_dir="c")
    assert config.local_dir == str(tmp_path / "c")
    monkeypatch.chdir("/")
    assert dm.current_config().cache_dir == tmp_path / "c"


def test_repairing_an_invalid_saved_config_keeps_its_other_fields(
    tmp_path: Path, daman_home: Path
) -> None:
    with pytest.warns(dm.ConfigWarning, match="checksums applies to service aws only"):
        configure_local(tmp_path, allocated_space="5MB", checksums="when_required", check=False)
    path = daman_home / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "endpoint_url": "bad", "from_the_future": 1}))
    with pytest.raises(dm.ConfigError):
        dm.current_config()
    config = dm.configure(endpoint_url=None)
    assert config.allocated_space == 5 * 10**6 and config.checksums == "when_required"
    assert config.local_dir == str(tmp_path / "cache")
    assert json.loads(path.read_text())["from_the_future"] == 1  # a newer daman's, kept


def test_a_failed_store_check_leaves_the_cache_alone(tmp_path: Path, s3_endpoint: str) -> None:
    configure_local(tmp_path, allocated_space="10MB")
    dm.push(np.zeros(100_000), "a")
    dm.push(np.zeros(100_000), "b")
    with pytest.raises(dm.StorageNotFoundError):
        dm.configure(
            service="aws", storage_name="no-such-bucket-xyz", endpoint_url=s3_endpoint,
            allocated_space=1,
        )  # fmt: skip
    assert dm.current_config().service == "local"
    assert len(dm.usage().entries) == 2  # nothing was evicted to the unsaved allocation


def test_a_local_store_folder_that_cannot_be_made_is_a_daman_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(dm.LocalFileError, match=r"the store folder .* a file stands where"):
        dm.configure(storage_name=str(tmp_path / "a-file" / "store"), service="local")
