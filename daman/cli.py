"""Console scripts: each one parses its flags, calls the core, and prints the result.

Exit codes: 0 success, 1 a daman error (one line on stderr), 2 bad usage (argparse).
Progress bars go to stderr, and are off with ``--quiet`` or when stdout is not a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import api, report
from .config import SERVICES, Config, format_size, load_config
from .credentials import write_aws_credentials
from .errors import DamanError
from .manager import Manager

Main = Callable[[Sequence[str] | None], int]
COMMANDS: dict[str, Main] = {}


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (also off when not on a terminal)"
    )
    return parser


def _add_key(parser: argparse.ArgumentParser, help: str = "the key, e.g. team/dataset/v1") -> None:
    parser.add_argument("--key", required=True, help=help)


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")


def _manager(quiet: bool) -> Manager:
    config = load_config()
    show = config.progress and not quiet and sys.stdout.isatty()
    return Manager(config.replace(progress=show))


def _run(prog: str, action: Callable[[], None]) -> int:
    try:
        action()
        sys.stdout.flush()  # a closed pipe shows up here, inside the handlers below
    except DamanError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dm_ls | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


def _command(name: str) -> Callable[[Main], Main]:
    """Register ``dm_<name>``, also reachable as ``python -m daman <name>``."""

    def register(main: Main) -> Main:
        COMMANDS[name] = main
        return main

    return register


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=repr))


# -- setup ---------------------------------------------------------------------------------


@_command("aws")
def aws_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_aws",
        "Save an AWS access key in the shared credentials file (~/.aws/credentials, or\n"
        "AWS_SHARED_CREDENTIALS_FILE), which boto3 and so daman read. Other profiles and\n"
        "comments in the file are kept; the file is private to you (mode 0600, folder 0700).\n"
        "The secret is never printed.\n\n"
        "example:\n"
        "  dm_aws --access_key_id AKIA... --secret_access_key ...",
    )
    parser.add_argument("--access_key_id", required=True, help="the access key id")
    parser.add_argument("--secret_access_key", required=True, help="the secret (never printed)")
    parser.add_argument("--profile", default="default", help="profile name (default: default)")
    args = parser.parse_args(argv)

    def action() -> None:
        path = write_aws_credentials(args.access_key_id, args.secret_access_key, args.profile)
        print(f"saved the access key of profile [{args.profile}] in {path}")

    return _run("dm_aws", action)


def _describe(config: Config) -> str:
    lines = [
        f"storage_name:    {config.storage_name}",
        f"service:         {config.service}",
        f"local_dir:       {config.cache_dir}",
        f"allocated_space: {format_size(config.allocated_space)}",
    ]
    if config.endpoint_url:
        lines.append(f"endpoint_url:    {config.endpoint_url}")
    if config.signing_key:
        lines.append("signing_key:     set (objects are signed; unsigned ones are refused)")
    return "\n".join(lines)


@_command("configure")
def configure_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_configure",
        "Choose where daman shares objects and how much local disc its cache may use.\n"
        "The settings are saved in $DAMAN_HOME/config.json (default ~/.daman/config.json);\n"
        "the store is checked to be reachable first. Settings left out keep their saved value.\n"
        "Lowering --allocated_space evicts least recently used entries on next use.\n\n"
        "examples:\n"
        "  dm_configure --service local --storage_name ~/shared/daman-store\n"
        "  dm_configure --service aws --storage_name my-bucket/team-a --allocated_space 20GiB\n"
        "  dm_configure --service aws --storage_name data --endpoint_url http://minio:9000\n"
        "  dm_configure --service gcs --storage_name my-bucket/team-a\n"
        "  dm_configure --service azure --storage_name my-container/team-a \\\n"
        "      --endpoint_url https://myaccount.blob.core.windows.net",
    )
    parser.add_argument(
        "--storage_name",
        required=True,
        help="bucket[/prefix] (aws, gcs), container[/prefix] (azure) or a folder (local)",
    )
    parser.add_argument(
        "--service",
        required=True,
        choices=list(SERVICES),
        help="store type: aws (S3 and S3-compatible), gcs (Google Cloud Storage), azure "
        "(Azure Blob Storage) or local (a folder)",
    )
    # Optional settings left out keep their saved value (or their default the first time).
    parser.add_argument(
        "--local_dir", default=argparse.SUPPRESS, help="local cache folder (default ~/.daman/data)"
    )
    parser.add_argument(
        "--allocated_space",
        default=argparse.SUPPRESS,
        help="most disc the cache may use: bytes or a size such as 500MB, 2GiB, or 'none' "
        "(default: no limit)",
    )
    parser.add_argument(
        "--endpoint_url",
        default=argparse.SUPPRESS,
        help="S3-compatible endpoint (MinIO, Ceph, R2, ...), the Azure account's blob URL, or "
        "an emulator's URL; 'none' to clear it",
    )
    parser.add_argument(
        "--signing_key",
        default=argparse.SUPPRESS,
        help="the team's secret for signing objects ('none' to stop); pulls then refuse "
        "objects not signed with it. DAMAN_SIGNING_KEY in the environment works too",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="save without checking the store is reachable"
    )
    args = parser.parse_args(argv)

    def action() -> None:
        fields = vars(args).copy()
        check = not fields.pop("no_check")
        fields.pop("quiet")
        for name in ("endpoint_url", "signing_key"):
            if str(fields.get(name, "")).lower() == "none":
                fields[name] = None
        config = api.configure(**fields, check=check)
        print(f"saved to {api.config_path()}:\n{_describe(config)}")

    return _run("dm_configure", action)


# -- moving objects --------------------------------------------------------------------------


@_command("push")
def push_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_push",
        "Share a file's bytes under a key, so that scripts outside Python can share data\n"
        "too. In Python, dm.pull(KEY) returns them as bytes; dm_pull --key KEY --output FILE\n"
        "writes them back to a file. A file is streamed from disc, not loaded into memory;\n"
        "stdin ('-') and pipes are read into memory first.\n\n"
        "examples:\n"
        "  dm_push --key team/raw/2026-11.csv --file export.csv --meta 'nightly export'\n"
        "  some-tool | dm_push --key team/raw/latest --file -",
    )
    _add_key(parser)
    parser.add_argument("--file", required=True, help="the file to push; '-' reads stdin")
    parser.add_argument("--meta", help="text stored as the object's meta (shown by dm_info)")
    parser.add_argument(
        "--force", action="store_true", help="replace the key if it exists (else an error)"
    )
    parser.add_argument(
        "--persist", action="store_true", help="pin the local copy: only a delete removes it"
    )
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            options = dict(meta=args.meta, force=args.force, persist=args.persist)
            if args.file == "-":
                info = manager.push(sys.stdin.buffer.read(), args.key, **options)
            else:
                info = manager.push_file(args.file, args.key, **options)
        # The stored size, as dm_ls and dm_info show it.
        print(f"pushed {args.key} ({format_size(info.size)}) to {manager.store.describe()}")

    return _run("dm_push", action)


@_command("pull")
def pull_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_pull",
        "Bring a key into the local cache (without loading it) and print where it lives.\n"
        "A cached copy that is still current is not downloaded again. With --output, write\n"
        "the bytes of a key pushed by dm_push to a file instead ('-' for stdout).\n\n"
        "examples:\n"
        "  dm_pull --key team/model/v3 --persist\n"
        "  dm_pull --key team/raw/2026-11.csv --output export.csv",
    )
    _add_key(parser)
    parser.add_argument("--force", action="store_true", help="download even if cached")
    parser.add_argument(
        "--persist", action="store_true", help="pin it: only an explicit delete removes it"
    )
    parser.add_argument(
        "--output", metavar="FILE", help="write the key's bytes (from dm_push) to FILE or '-'"
    )
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            options = dict(force=args.force, persist=args.persist)
            if args.output == "-":
                sys.stdout.buffer.write(manager.pull_bytes(args.key, **options))
                sys.stdout.flush()
            elif args.output:
                size = manager.pull_file(args.key, args.output, **options)
                print(f"wrote {args.key} ({format_size(size)}) to {args.output}")
            else:
                entry = manager.fetch(args.key, **options)
                pinned = ", persisted" if entry.persist else ""
                print(f"{args.key}: {format_size(entry.size)}{pinned} at {entry.path}")

    return _run("dm_pull", action)


@_command("delete")
def delete_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_delete",
        "Remove a key's local cached copy; with --remote, also the stored object, for\n"
        "everyone (asks for confirmation on a terminal unless --yes).",
    )
    _add_key(parser, "the key to delete")
    parser.add_argument("--remote", action="store_true", help="also delete it from the store")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    args = parser.parse_args(argv)

    def action() -> None:
        if args.remote and not args.yes and sys.stdin.isatty():
            try:
                answer = input(f"delete {args.key!r} from the store for everyone? [y/N] ")
            except EOFError:  # Ctrl-D: no
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return
        with _manager(quiet=True) as manager:
            manager.delete(args.key, local=True, remote=args.remote)
        print(f"deleted {args.key}" + (" (local copy and stored object)" if args.remote else ""))

    return _run("dm_delete", action)


# -- looking around --------------------------------------------------------------------------


@_command("ls")
def ls_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_ls",
        "List the keys in the store under a prefix. --long adds size, last modified and\n"
        "whether each is cached here (and persisted); --json prints all of it for scripts.\n\n"
        "examples:\n"
        "  dm_ls team/ --long\n"
        "  dm_ls --json | jq '.[] | select(.cached) | .key'",
    )
    parser.add_argument("prefix", nargs="?", default="", help="only keys starting with this")
    parser.add_argument("--long", "-l", action="store_true", help="size, date, cache state")
    _add_json(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            listing = manager.ls(args.prefix)
        if args.json:
            _print_json(report.listing_data(listing))
        elif args.long:
            print("\n".join(report.listing_lines(listing)))
        else:
            print("\n".join(item.key for item in listing))

    return _run("dm_ls", action)


@_command("info")
def info_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_info",
        "Describe a stored object without downloading it (one ranged read of its end):\n"
        "size, sha256, who pushed it and when, with which Python, its meta, and whether it\n"
        "is cached here.",
    )
    _add_key(parser)
    _add_json(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            details = manager.info(args.key)
        if args.json:
            _print_json(report.details_data(details))
        else:
            print("\n".join(report.details_lines(details)))

    return _run("dm_info", action)


@_command("status")
def status_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_status",
        "Show the store in use, the local cache's disc use against its allocation, and the\n"
        "persisted entries. Reads only local bookkeeping: works offline.",
    )
    _add_json(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            usage = manager.usage()
            local_dir = manager.cache.root
        if args.json:
            _print_json(report.usage_data(usage, local_dir))
        else:
            print("\n".join(report.usage_lines(usage, local_dir)))

    return _run("dm_status", action)


# -- managing the cache ----------------------------------------------------------------------


@_command("persist")
def persist_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_persist",
        "Pin a cached key so that eviction never removes it (only dm_delete does), or unpin\n"
        "it with --off. The key must be cached: dm_pull --key KEY --persist pulls and pins.",
    )
    _add_key(parser)
    parser.add_argument("--off", action="store_true", help="unpin: let eviction remove it again")
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            manager.set_persist(args.key, not args.off)
        print(f"{args.key}: " + ("no longer persisted" if args.off else "persisted"))

    return _run("dm_persist", action)


@_command("clear")
def clear_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_clear",
        "Evict every cached entry that is not persisted, and report the disc space freed.\n"
        "Nothing in the store is touched; persisted entries stay (dm_delete removes them).",
    )
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            before = len(manager.usage().entries)
            freed = manager.clear()
            after = manager.usage()
        evicted = report.count(before - len(after.entries), "entry", "entries")
        kept = report.count(len(after.entries), "persisted entry", "persisted entries")
        print(f"freed {format_size(freed)} ({evicted}); kept {kept} ({format_size(after.used)})")

    return _run("dm_clear", action)


@_command("verify")
def verify_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_verify",
        "Check the local cache: hash every cached copy (or one key's) against the sha256\n"
        "recorded when it was written, and its signature when signing_key is set; reconcile\n"
        "the index with the files on disc. Damaged copies are removed, so the next pull\n"
        'downloads them again. --json reports it for scripts ("ok": false if anything was\n'
        "repaired).",
    )
    parser.add_argument("--key", help="check only this key's cached copy")
    _add_json(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            result = manager.verify(args.key)
        if args.json:
            _print_json(report.verify_data(result))
        else:
            print("\n".join(report.verify_lines(result)))

    return _run("dm_verify", action)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daman COMMAND ...``: the console scripts without their ``dm_`` prefix."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: python -m daman {{{names}}} [--help] ...\n\n"
            "The dm_* console scripts, without their prefix; `python -m daman COMMAND --help`\n"
            "describes each one.",
            file=sys.stdout if argv else sys.stderr,
        )
        return 0 if argv else 2
    command = argv[0].removeprefix("dm_")
    if command not in COMMANDS:
        print(f"python -m daman: unknown command {argv[0]!r}; choose from {names}", file=sys.stderr)
        return 2
    return COMMANDS[command](argv[1:])
