"""Console scripts: each one parses its flags, calls the core, and prints the result.

Exit codes: 0 success, 1 a daman error (one line on stderr), 2 bad usage (argparse).
Progress bars go to stderr, and are off with ``--quiet`` or when stdout is not a terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import api
from .config import Config, format_size, load_config
from .credentials import write_aws_credentials
from .errors import DamanError
from .manager import Manager


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _manager(quiet: bool) -> Manager:
    config = load_config()
    show = config.progress and not quiet and sys.stdout.isatty()
    return Manager(config.replace(progress=show))


def _run(prog: str, action: Callable[[], None]) -> int:
    try:
        action()
    except DamanError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def aws_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_aws",
        "Save an AWS access key in the shared credentials file (~/.aws/credentials, or\n"
        "AWS_SHARED_CREDENTIALS_FILE), which boto3 and so daman read. Other profiles and\n"
        "comments in the file are kept; the file is private to you (mode 0600).",
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
    return "\n".join(lines)


def configure_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_configure",
        "Choose where daman shares objects and how much local disc its cache may use.\n"
        "The settings are saved in $DAMAN_HOME/config.json (default ~/.daman/config.json).\n\n"
        "examples:\n"
        "  dm_configure --service local --storage_name ~/shared/daman-store\n"
        "  dm_configure --service aws --storage_name my-bucket/team-a --allocated_space 20GiB",
    )
    parser.add_argument(
        "--storage_name", required=True, help="bucket[/prefix] (aws) or a folder (local)"
    )
    parser.add_argument("--service", required=True, choices=["aws", "local"], help="store type")
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
        help="S3-compatible endpoint (MinIO, Ceph, R2, ...); 'none' to clear it",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="save without checking the store is reachable"
    )
    args = parser.parse_args(argv)

    def action() -> None:
        fields = vars(args).copy()
        check = not fields.pop("no_check")
        if str(fields.get("endpoint_url", "")).lower() == "none":
            fields["endpoint_url"] = None
        config = api.configure(**fields, check=check)
        print(f"saved to {api.config_path()}:\n{_describe(config)}")

    return _run("dm_configure", action)


def pull_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_pull",
        "Bring a key into the local cache (without loading it) and print where it lives.\n"
        "A cached copy that is still current is not downloaded again.",
    )
    parser.add_argument("--key", required=True, help="the key, e.g. team/dataset/v1")
    parser.add_argument("--force", action="store_true", help="download even if cached")
    parser.add_argument(
        "--persist", action="store_true", help="pin it: only an explicit delete removes it"
    )
    _add_quiet(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            entry = manager.fetch(args.key, force=args.force, persist=args.persist)
            pinned = ", persisted" if entry.persist else ""
            print(f"{args.key}: {format_size(entry.size)}{pinned} at {entry.path}")

    return _run("dm_pull", action)


def delete_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_delete",
        "Remove a key's local cached copy; with --remote, also the stored object, for\n"
        "everyone (asks for confirmation on a terminal unless --yes).",
    )
    parser.add_argument("--key", required=True, help="the key to delete")
    parser.add_argument("--remote", action="store_true", help="also delete it from the store")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    args = parser.parse_args(argv)

    def action() -> None:
        if args.remote and not args.yes and sys.stdin.isatty():
            answer = input(f"delete {args.key!r} from the store for everyone? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return
        with _manager(quiet=True) as manager:
            manager.delete(args.key, local=True, remote=args.remote)
        print(f"deleted {args.key}" + (" (local copy and stored object)" if args.remote else ""))

    return _run("dm_delete", action)


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "aws": aws_main,
    "configure": configure_main,
    "pull": pull_main,
    "delete": delete_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daman COMMAND ...``: the console scripts without their ``dm_`` prefix."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m daman {{{names}}} [--help] ...")
        return 0 if argv else 2
    command = argv[0].removeprefix("dm_")
    if command not in COMMANDS:
        print(f"python -m daman: unknown command {argv[0]!r}; choose from {names}", file=sys.stderr)
        return 2
    return COMMANDS[command](argv[1:])
