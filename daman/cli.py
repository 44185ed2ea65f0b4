"""Console scripts: each one parses its flags, calls the core, and prints the result.

Exit codes: 0 success, 1 a daman error (one line on stderr), 2 bad usage (argparse).
Progress bars go to stderr, and are off with ``--quiet`` or when stdout is not a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import __version__, api, report
from .config import CHECKSUM_MODES, DEFAULTS, SERVICES, load_config
from .credentials import write_aws_credentials
from .errors import DamanError, InvalidArgumentError
from .manager import Manager
from .results import LevelListing
from .serialize import FileBytes

T = TypeVar("T")
Main = Callable[[Sequence[str] | None], int]
COMMANDS: dict[str, Main] = {}


class _Parser(argparse.ArgumentParser):
    def _print_message(self, message: str, file: Any = None) -> None:
        # argparse swallows a failed write of --help or a usage error: let it through, to be
        # told as one line (or a closed pipe, quietly) by _guarded.
        if message:
            (file or sys.stderr).write(message)


def _parser(
    prog: str, description: str, *, object_version: bool = False
) -> argparse.ArgumentParser:
    """A command's parser; with ``object_version``, ``--version ID`` names a version of the
    key (see dm_history) and ``--version`` alone still prints daman's own."""
    parser = _Parser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (also off when not on a terminal)"
    )
    if object_version:
        parser.add_argument(
            "--version", dest="object_version", metavar="ID", nargs="?", const=_DAMAN_VERSION,
            help="a version of the key (an id from dm_history); alone: daman's version",
        )  # fmt: skip
    else:
        parser.add_argument("--version", action="version", version=f"daman {__version__}")
    return parser


_DAMAN_VERSION = object()
"""``--version`` given without an id: print daman's version, as every command does."""


def _object_version(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    if args.object_version is _DAMAN_VERSION:
        print(f"daman {__version__}")
        parser.exit(0)
    return args.object_version


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
        with report.one_line_warnings(prog):
            action()
        sys.stdout.flush()  # a closed pipe or a full disc shows up here
    except DamanError as exc:
        print(report.error_line(prog, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(report.interrupted_line(prog), file=sys.stderr)
        return 130
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _guarded(prog: str, main: Main) -> Main:
    """Standard streams that are closed, full or gone: one line and exit 1 (a reader that
    left a pipe, as ``| head`` does: exit 0, quietly), never a traceback."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        if sys.stdout is None:  # started with stdout closed (>&-)
            if sys.stderr is not None:
                print(f"{prog}: error: standard output is closed", file=sys.stderr)
            return 1
        try:
            return main(argv)
        except BrokenPipeError:
            _silence_stdout()
            return 0
        except OSError as exc:  # writing to a full disc (> /dev/full), an I/O error
            _silence_stdout()
            if sys.stderr is not None:
                with contextlib.suppress(OSError):
                    print(f"{prog}: error: cannot write the output ({exc.strerror or exc})",
                          file=sys.stderr)  # fmt: skip
            return 1

    return run


def _command(name: str) -> Callable[[Main], Main]:
    """Register ``dm_<name>``, also reachable as ``python -m daman <name>``."""

    def register(main: Main) -> Main:
        guarded = _guarded(f"dm_{name}", main)
        COMMANDS[name] = guarded
        return guarded

    return register


def _secret(value: str | None, what: str) -> str | None:
    """A secret given as ``-`` (or an option without its value): typed at a prompt without
    echo on a terminal, else read from the first line of stdin, so that it never lands in
    the shell's history or the process list."""
    if value != "-":
        return value
    if sys.stdin is None:
        raise InvalidArgumentError(f"{what} is to be read from stdin, which is closed.")
    if sys.stdin.isatty():
        try:
            return getpass.getpass(f"{what}: ")
        except EOFError:
            raise InvalidArgumentError(f"no {what} was typed.") from None
    line = sys.stdin.readline().strip()
    if not line:
        raise InvalidArgumentError(f"no {what} on stdin.")
    return line


def _print_json(data: Any) -> None:
    print(report.to_json(data))


# -- setup ---------------------------------------------------------------------------------


@_command("aws")
def aws_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_aws",
        "Save an AWS access key in the shared credentials file (~/.aws/credentials, or\n"
        "AWS_SHARED_CREDENTIALS_FILE), which boto3 and so daman read. Other profiles and\n"
        "comments in the file are kept; the file is private to you (mode 0600, folder 0700).\n"
        "The secret is never printed.\n\n"
        "examples:\n"
        "  dm_aws --access_key_id AKIA... --secret_access_key     (asks for the secret)\n"
        "  pass show aws/team | dm_aws --access_key_id AKIA... --secret_access_key -",
    )
    parser.add_argument("--access_key_id", required=True, help="the access key id")
    parser.add_argument(
        "--secret_access_key",
        required=True,
        nargs="?",
        const="-",
        metavar="SECRET",
        help="the secret (never printed); without a value (or '-') it is asked for without "
        "echo, or read from stdin, so that it stays out of the shell's history",
    )
    parser.add_argument("--profile", default="default", help="profile name (default: default)")
    args = parser.parse_args(argv)

    def action() -> None:
        secret = _secret(args.secret_access_key, "AWS secret access key")
        path, dropped = write_aws_credentials(args.access_key_id, secret, args.profile)
        print("\n".join(report.aws_saved_lines(args.profile, path, dropped)))

    return _run("dm_aws", action)


def _yes_no(text: str) -> bool:
    answer = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in answer:
        raise argparse.ArgumentTypeError(f"give true or false, not {text!r}")
    return answer[text.lower()]


def _default(name: str) -> str:
    """A configuration field's default as the help shows it: taken from Config itself."""
    value = DEFAULTS[name]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


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
        "      --endpoint_url https://myaccount.blob.core.windows.net\n"
        "  dm_configure --signing_key        (asks for the team's secret without echo)\n"
        "  dm_configure --read_timeout 120  (change one setting, keep the others)",
    )
    # Settings left out keep their saved value (or their default the first time).
    keep = argparse.SUPPRESS
    parser.add_argument(
        "--storage_name",
        default=keep,
        help="bucket[/prefix] (aws, gcs; also s3://bucket/prefix for aws, gs://bucket/prefix "
        "for gcs), container[/prefix] (azure), or a folder (local); required the first time",
    )
    parser.add_argument(
        "--service",
        default=keep,
        choices=list(SERVICES),
        help="store type: aws (S3 and S3-compatible), gcs (Google Cloud Storage), azure "
        "(Azure Blob Storage) or local (a folder); required the first time",
    )
    parser.add_argument(
        "--local_dir",
        default=keep,
        help="local cache folder (default $DAMAN_HOME/data; DAMAN_HOME defaults to ~/.daman)",
    )
    parser.add_argument(
        "--allocated_space",
        default=keep,
        help="most disc the cache may use: bytes or a size such as 500MB, 2GiB, or 'none' "
        "(default: no limit)",
    )
    parser.add_argument(
        "--endpoint_url",
        default=keep,
        help="S3-compatible endpoint (MinIO, Ceph, R2, ...), the Azure account's blob URL, or "
        "an emulator's URL; 'none' to clear it",
    )
    parser.add_argument("--region", default=keep, help="AWS region (aws only); 'none' to clear it")
    parser.add_argument(
        "--signing_key",
        default=keep,
        nargs="?",
        const="-",
        metavar="SECRET",
        help="the team's secret for signing objects; without a value (or '-') it is asked "
        "for without echo, or read from stdin. Pulls then refuse objects not signed with it; "
        "'none' stops signing. DAMAN_SIGNING_KEY in the environment works too",
    )
    parser.add_argument(
        "--check_current",
        default=keep,
        type=_yes_no,
        metavar="{true,false}",
        help="ask the store (one HEAD) whether a cached copy is current "
        f"(default {_default('check_current')})",
    )
    parser.add_argument(
        "--checksums",
        default=keep,
        choices=CHECKSUM_MODES,
        help="request checksums (aws only; default "
        f"{_default('checksums')}); when_required for S3-compatible stores that reject them",
    )
    parser.add_argument(
        "--connect_timeout",
        default=keep,
        type=float,
        help=f"seconds (default {_default('connect_timeout')})",
    )
    parser.add_argument(
        "--read_timeout",
        default=keep,
        type=float,
        help=f"seconds (default {_default('read_timeout')})",
    )
    parser.add_argument(
        "--max_attempts",
        default=keep,
        type=int,
        help=f"tries per request (default {_default('max_attempts')})",
    )
    parser.add_argument(
        "--progress",
        default=keep,
        type=_yes_no,
        metavar="{true,false}",
        help=f"progress bars on transfers over 8 MiB (default {_default('progress')})",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="save without checking the store is reachable"
    )
    args = parser.parse_args(argv)

    def action() -> None:
        fields = vars(args).copy()
        check = not fields.pop("no_check")
        fields.pop("quiet")
        if "signing_key" in fields:
            fields["signing_key"] = _secret(fields["signing_key"], "signing key")
        config = api.configure(**fields, check=check)
        print("\n".join(report.config_lines(config, api.config_path())))

    return _run("dm_configure", action)


# -- moving objects --------------------------------------------------------------------------


@_command("push")
def push_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_push",
        "Share a file's bytes under a key, so that scripts outside Python can share data\n"
        "too. In Python, dm.pull(KEY) returns them as bytes; dm_pull --key KEY --output FILE\n"
        "writes them back to a file. A file, a pipe or stdin ('-') is streamed through in\n"
        "chunks, never loaded into memory whole; a file that changes while it is read is\n"
        "refused (nothing is pushed).\n\n"
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
                if sys.stdin is None:
                    raise InvalidArgumentError("stdin is closed: nothing to push (or --file PATH).")
                stdin = FileBytes(sys.stdin.buffer, "stdin")
                info = manager.push(stdin, args.key, **options)
            else:
                info = manager.push_file(args.file, args.key, **options)
        print(report.pushed_line(args.key, info.size, store=manager.store.describe()))

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
        "  dm_pull --key team/raw/2026-11.csv --output export.csv\n"
        "  dm_pull --key team/model/v3 --version ID   (an id from dm_history)",
        object_version=True,
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
    version = _object_version(parser, args)

    def action() -> None:
        with _manager(args.quiet) as manager:
            options = dict(force=args.force, persist=args.persist, version=version)
            if args.output == "-":
                sys.stdout.buffer.write(manager.pull_bytes(args.key, **options))
                sys.stdout.flush()
            elif args.output:
                size = manager.pull_file(args.key, args.output, **options)
                print(report.wrote_line(args.key, size, args.output))
            else:
                entry = manager.fetch(args.key, **options)
                print(
                    report.fetched_line(
                        args.key, entry.size, persist=entry.persist, path=entry.path
                    )
                )

    return _run("dm_pull", action)


@_command("history")
def history_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_history",
        "List a key's versions, newest first: id, size, who pushed it and when, with which\n"
        "Python, its meta; the current one is marked *. A deleted key keeps its versions.\n\n"
        "examples:\n"
        "  dm_history --key team/model/v3\n"
        "  dm_pull --key team/model/v3 --version ID\n"
        "  dm_restore --key team/model/v3 --version ID",
    )
    return _show_key(
        "dm_history",
        parser,
        argv,
        lambda manager, key: manager.history(key),
        report.history_data,
        report.history_lines,
    )


def _show_key(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    read: Callable[[Manager, str], T],
    data: Callable[[T], Any],
    lines: Callable[[T], list[str]],
) -> int:
    """A command that shows what ``read`` tells of ``--key``: lines for people, or with
    ``--json`` the ``data`` for scripts (dm_history, dm_info)."""
    _add_key(parser)
    _add_json(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            found = read(manager, args.key)
        if args.json:
            _print_json(data(found))
        else:
            print("\n".join(lines(found)))

    return _run(prog, action)


@_command("restore")
def restore_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_restore",
        "Make an older version of a key (an id from dm_history) its current version again,\n"
        "for everyone; also brings back a deleted key. The restore is a new version: the\n"
        "version it replaces stays in the history.\n\n"
        "examples:\n"
        "  dm_restore --key team/model/v3 --version ID   (an id from dm_history)\n"
        "  dm_restore --key team/model/v3 --version ID --quiet",
        object_version=True,
    )
    _add_key(parser)
    args = parser.parse_args(argv)
    version = _object_version(parser, args)
    if version is None:
        parser.error("the following arguments are required: --version ID")

    def action() -> None:
        with _manager(args.quiet) as manager:
            manager.restore(args.key, version=version)
        print(report.restored_line(args.key, version))

    return _run("dm_restore", action)


@_command("delete")
def delete_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_delete",
        "Remove a key's local cached copies; with --remote, also the stored object, for\n"
        "everyone (its versions stay: dm_history, dm_restore); with --all-versions, every\n"
        "version too (asks for confirmation on a terminal unless --yes).\n\n"
        "examples:\n"
        "  dm_delete --key team/model/v3                  # free this machine's copies\n"
        "  dm_delete --key team/model/v3 --remote         # gone for everyone (asks first)\n"
        "  dm_delete --key team/model/v3 --remote --yes   # in a script: no question\n"
        "  dm_delete --key team/model/v3 --remote --all-versions   # and its history",
    )
    _add_key(parser, "the key to delete")
    parser.add_argument("--remote", action="store_true", help="also delete it from the store")
    parser.add_argument(
        "--all-versions", action="store_true", help="with --remote: remove its history too"
    )
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(quiet=True) as manager:
            if args.remote and not args.yes and sys.stdin.isatty():
                question = report.delete_question(
                    args.key, manager.store.describe(), all_versions=args.all_versions
                )
                if not _confirmed(f"{question} [y/N] "):
                    print(report.NOT_DELETED)
                    return
            deleted = manager.delete(
                args.key, local=True, remote=args.remote, all_versions=args.all_versions
            )
        print(report.deleted_line(deleted))

    return _run("dm_delete", action)


def _confirmed(question: str) -> bool:
    """Ask on stderr (seen even when stdout goes to a file) and read one line of stdin."""
    try:
        print(question, end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline()
    except KeyboardInterrupt:  # end the prompt's line before saying "interrupted"
        print(file=sys.stderr)
        raise
    if not answer.endswith("\n"):  # Ctrl-D: no, on a line of its own
        print(file=sys.stderr)
    return answer.strip().lower() in ("y", "yes")


# -- looking around --------------------------------------------------------------------------


@_command("ls")
def ls_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_ls",
        "List the keys in the store under a prefix. --long adds size, last modified and\n"
        "whether each is cached here (and persisted); --json prints all of it for scripts.\n"
        "--level lists one level, as a folder: the sub-prefixes and the keys directly under\n"
        "PREFIX, one request per 1,000 names however many keys lie below. When there is\n"
        "nothing to list, it says so (on stderr without --long or --json: stdout stays empty).\n\n"
        "examples:\n"
        "  dm_ls team/ --long\n"
        "  dm_ls team/ --level\n"
        "  dm_ls --json | jq '.[] | select(.cached) | .key'",
    )
    parser.add_argument("prefix", nargs="?", default="", help="only keys starting with this")
    parser.add_argument("--long", "-l", action="store_true", help="size, date, cache state")
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="mark daman 0.2 objects (reads each key's last 16 bytes: one small request per "
        "key on S3)",
    )
    parser.add_argument(
        "--level", action="store_true", help="one level: sub-prefixes, then the keys in it"
    )
    _add_json(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        if args.level:
            return level_action()
        with _manager(args.quiet) as manager:
            listing = manager.ls(args.prefix, legacy=args.legacy)
            store = manager.store.describe()
        if args.json:
            _print_json(report.listing_data(listing))
        elif not listing:
            _say_empty(args.prefix, store, long=args.long)
        elif args.long:
            print("\n".join(report.listing_lines(listing)))
        else:
            print("\n".join(item.key for item in listing))

    def level_action() -> None:
        with _manager(args.quiet) as manager:
            pages = [manager.ls_level(args.prefix)]
            while pages[-1].token is not None:
                pages.append(manager.ls_level(args.prefix, token=pages[-1].token))
            store = manager.store.describe()
        empty = not any(page.prefixes or page.keys for page in pages)
        if args.json:
            whole = LevelListing(
                args.prefix,
                [p for page in pages for p in page.prefixes],
                [k for page in pages for k in page.keys],
                None,
            )
            _print_json(report.level_data(whole))
        elif empty:
            _say_empty(args.prefix, store, long=args.long)
        elif args.long:
            print("\n".join(report.level_lines(pages)))
        else:
            names = [p for page in pages for p in page.prefixes]
            names += [k.key for page in pages for k in page.keys]
            print("\n".join(names))

    return _run("dm_ls", action)


def _say_empty(prefix: str, store: str, *, long: bool) -> None:
    """An empty listing: said on stdout with --long (a table for people); on stderr without
    it, so that a script reading one key per line gets none."""
    print(report.empty_listing_line(prefix, store), file=sys.stdout if long else sys.stderr)


@_command("info")
def info_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_info",
        "Describe a stored object without downloading it (one ranged read of its end):\n"
        "size, sha256, who pushed it and when, with which Python, its meta, and whether it\n"
        "is cached here.\n\n"
        "examples:\n"
        "  dm_info --key team/model/v3\n"
        "  dm_info --key team/model/v3 --json | jq .meta",
    )
    return _show_key(
        "dm_info",
        parser,
        argv,
        lambda manager, key: manager.info(key),
        report.details_data,
        report.details_lines,
    )


@_command("status")
def status_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_status",
        "Show the store in use, the local cache's disc use against its allocation, and the\n"
        "persisted entries. Reads only local bookkeeping: works offline.\n\n"
        "examples:\n"
        "  dm_status\n"
        "  dm_status --json | jq .free",
    )
    _add_json(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:  # the persisted entries are read in here
            usage, mapped, local_dir = manager.usage(), manager.mapped(), manager.cache.root
            if args.json:
                data = {**report.usage_data(usage, local_dir), "mapped": report.mapped_data(mapped)}
            else:
                lines = report.usage_lines(usage, local_dir) + report.mapped_lines(mapped)
        if args.json:
            _print_json(data)
        else:
            print("\n".join(lines))

    return _run("dm_status", action)


# -- managing the cache ----------------------------------------------------------------------


@_command("persist")
def persist_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_persist",
        "Pin a cached key so that eviction never removes it (only dm_delete does), or unpin\n"
        "it with --off. The key must be cached: dm_pull --key KEY --persist pulls and pins.\n\n"
        "examples:\n"
        "  dm_persist --key team/model/v3\n"
        "  dm_persist --key team/model/v3 --off",
    )
    _add_key(parser)
    parser.add_argument("--off", action="store_true", help="unpin: let eviction remove it again")
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            manager.set_persist(args.key, not args.off)
        print(report.persist_line(args.key, on=not args.off))

    return _run("dm_persist", action)


@_command("clear")
def clear_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_clear",
        "Evict every cached entry that is not persisted, and report the disc space freed.\n"
        "Nothing in the store is touched; persisted entries stay (dm_delete removes them).\n\n"
        "examples:\n"
        "  dm_clear\n"
        "  dm_clear && dm_status",
    )
    args = parser.parse_args(argv)

    def action() -> None:
        with _manager(args.quiet) as manager:
            before = manager.usage().count
            freed = manager.clear()
            after = manager.usage()
        print(report.cleared_line(freed, before - after.count, after.count, after.used))

    return _run("dm_clear", action)


@_command("verify")
def verify_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_verify",
        "Check the local cache: hash every cached copy (or one key's) against the sha256\n"
        "recorded when it was written, and its signature when signing_key is set; reconcile\n"
        "the index with the files on disc. Damaged copies are removed, so the next pull\n"
        'downloads them again. --json reports it for scripts ("ok": false if anything was\n'
        "repaired).\n\n"
        "examples:\n"
        "  dm_verify\n"
        "  dm_verify --key team/model/v3\n"
        "  dm_verify --json | jq .ok",
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


# -- upgrading from daman 0.2 ----------------------------------------------------------------


@_command("migrate")
def migrate_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "dm_migrate",
        "Upgrade from daman 0.2.\n\n"
        "Without --local: rewrite every daman 0.2 object of the store (or those under PREFIX)\n"
        "in today's format, with its meta, signed when signing_key is set. Each object is\n"
        "replaced only if it is still the version that was read: a change made meanwhile is\n"
        "never overwritten (it is reported as refused). Objects already converted are\n"
        "skipped, so an interrupted run is finished by running it again. Each 0.2 object is\n"
        "loaded (after its md5 is checked) to be rewritten: with a signing key, converting\n"
        'an object vouches for it. Needs joblib: pip install "daman[legacy]".\n\n'
        "With --local: import this machine's daman 0.2 setup (~/.daman/config and its\n"
        "registry) as today's configuration, and pull again, persisted, the keys 0.2 had\n"
        "persisted. The 0.2 cache folder is left untouched, for you to delete.\n\n"
        "Exit code 1 if an object (or a persisted key) could not be migrated.\n\n"
        "examples:\n"
        "  dm_migrate --dry-run       # list the daman 0.2 objects; change nothing\n"
        "  dm_migrate                 # convert them all\n"
        "  dm_migrate team/models/    # only those under a prefix\n"
        "  dm_migrate --local         # import this machine's daman 0.2 setup",
    )
    parser.add_argument("prefix", nargs="?", default="", help="only keys starting with this")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done; do nothing")
    parser.add_argument(
        "--local", action="store_true", help="import this machine's daman 0.2 setup instead"
    )
    args = parser.parse_args(argv)
    if args.local and args.prefix:
        parser.error("--local imports the machine's setup; it takes no PREFIX")
    show = not args.quiet and sys.stdout.isatty()

    def action() -> None:
        from .migrate import import_setup, migrate_store

        if args.local:
            imported = import_setup(dry_run=args.dry_run, progress=show)
            print("\n".join(report.setup_import_lines(imported)))
            if not imported.ok:
                raise DamanError(report.setup_import_failure(imported))
            return
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(desc="dm_migrate", unit=" keys", leave=False, file=sys.stderr)

        def on_key(key: str, outcome: str, detail: str) -> None:
            line = report.migration_line(key, outcome, detail, dry_run=args.dry_run)
            if line is not None:
                (bar.write if bar is not None else print)(line)
                sys.stdout.flush()
            if bar is not None:
                bar.update(1)

        try:
            with _manager(args.quiet) as manager:
                result = migrate_store(manager, args.prefix, dry_run=args.dry_run, on_key=on_key)
        finally:
            if bar is not None:
                bar.close()
        print("\n".join(report.migration_summary(result)))
        if not result.ok:
            raise DamanError(report.migration_failure(result))

    return _run("dm_migrate", action)


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m daman COMMAND ...``: the console scripts without their ``dm_`` prefix."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(COMMANDS)
    if argv[:1] == ["--version"]:
        print(f"daman {__version__}")
        return 0
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


main = _guarded("python -m daman", _main)
