"""IPython magics: ``%load_ext daman`` registers ``%dm_push``, ``%dm_pull``, ``%dm_ls``,
``%dm_info``, ``%dm_delete``, ``%dm_status``, ``%dm_panel`` and the ``%%dm_cache`` cell magic.

A thin layer, like IPython's own ``storemagic``: each magic parses its line, calls the default
manager (``dm.get_manager()``, built from the configuration in use) and prints what happened in
one line; ``%dm_ls``, ``%dm_info`` and ``%dm_status`` show a table in Jupyter, text in a
terminal. A daman error shows as one line (``daman: error: ...``), not a traceback, and fails
the cell; a daman warning is one line too (``daman: warning: ...``); bad usage is IPython's
usual ``UsageError``. Progress bars are the manager's
(``tqdm.auto``: widgets in Jupyter, text in a terminal).
"""

from __future__ import annotations

import argparse
import ast
import functools
import keyword
import re
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.completer import (
    CompletionContext,
    SimpleCompletion,
    SimpleMatcherResult,
    context_matcher,
)
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.text import DollarFormatter

from . import api, report
from .errors import DamanError, InvalidArgumentError
from .keys import variable_name
from .listing import LISTING_TTL
from .manager import LEVEL_PAGE, Manager

COMPLETION_TTL = LISTING_TTL
"""Seconds a key listing keeps serving completions before the store is asked again."""


# -- helpers ---------------------------------------------------------------------------------


def _one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """A daman error shows as one line, not a traceback (its message already says what to do
    next), and still fails the cell, so that "run all" stops there. IPython renders an
    exception through its ``_render_traceback_()`` when it has one. A daman warning is one
    line too, as the console scripts show it: the line ``warn()`` would point at is inside
    IPython, not the user's."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with report.one_line_warnings("daman"):
                return func(*args, **kwargs)
        except DamanError as exc:
            line = report.error_line("daman", exc)
            exc._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]
            raise

    return wrapper


def _parse(magic: Any, line: str) -> argparse.Namespace:
    """``magic``'s arguments, split the POSIX way: quotes group words and are removed (the
    default split of ``magic_arguments`` keeps them, and they would reach ``--meta``'s eval)."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{exc} in {line!r}") from None
    return magic.parser.parse_args(argv)


def _check_identifier(name: str, what: str) -> None:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"{what} {name!r} is not a valid Python variable name")


def _show(shell: Any, lines: list[str], html: str) -> None:
    """Today's text in a terminal, a table in Jupyter: one display of both, and each
    front-end draws the richest it can (IPython's terminal prints the text)."""
    shell.display_pub.publish({"text/plain": "\n".join(lines), "text/html": html})


def _expand(shell: Any, text: str) -> str:
    """``text`` with ``{var}`` and ``$var`` expanded from the user namespace, as IPython does
    to a magic's line (``shell.var_expand`` would also see the caller's local variables)."""
    try:
        return DollarFormatter().vformat(text, args=[], kwargs=shell.user_ns)
    except Exception:
        return text  # IPython too leaves a line it cannot expand as it is


def _is_bare_statement(shell: Any, magic: str, line: str) -> bool:
    """Whether the running cell calls ``%magic line`` only as statements of their own
    (``%dm_pull k``), never for the value (``x = %dm_pull k``). A bare pull returns None so
    that the object is neither displayed nor kept alive in ``Out``. Unsure means False."""
    try:
        tree = ast.parse(shell.history_manager.input_hist_parsed[-1])
    except (AttributeError, IndexError, SyntaxError, ValueError):
        return False
    bare = used = 0
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            if not (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "run_line_magic"
            ):
                continue
            args = [a.value for a in child.args if isinstance(a, ast.Constant)]
            # The magic got its line after IPython expanded {var} and $var in it.
            if args[:1] == [magic] and args[1:] and _expand(shell, str(args[1])) == line:
                used += 1
                bare += isinstance(node, ast.Expr)
    return used > 0 and bare == used


# -- completion ------------------------------------------------------------------------------

# The line up to the cursor when a key may be typed: `%dm_pull ...`, `x = %dm_pull ...`, ...
_KEY_COMMAND = re.compile(
    r"^\s*(?:[^=%]*=\s*)?(?P<cmd>%dm_pull|%dm_info|%dm_delete|%%dm_cache)\s+(?P<args>.*)$"
)
_VALUE_OPTIONS = {"--as"}


def _words(args: str) -> list[tuple[str, str]]:
    """``args`` split as the magics split their line (shlex, POSIX), keeping an unclosed
    quote at the end: ``(raw text, text without its quotes)`` per word; the last word is
    ``("", "")`` when ``args`` ends with whitespace."""
    words: list[tuple[str, str]] = []
    raw = text = ""
    quote = None
    for char in args:
        if quote:
            raw += char
            if char == quote:
                quote = None
            else:
                text += char
        elif char in "'\"":
            quote = char
            raw += char
        elif char.isspace():
            if raw:
                words.append((raw, text))
            raw = text = ""
        else:
            raw += char
            text += char
    words.append((raw, text))
    return words


def key_fragment(line: str, first_line: bool = True) -> tuple[str, str] | None:
    """The part of a key typed at the end of ``line`` (the text before the cursor), as
    ``(raw text, the key's text)`` (they differ when the key is quoted: it holds spaces),
    or None when the cursor is not where a key goes (another command, an option, a second
    word)."""
    match = _KEY_COMMAND.match(line)
    if match is None or (match["cmd"] == "%%dm_cache" and not first_line):
        return None
    *before, (raw, fragment) = _words(match["args"])
    words = [text for _, text in before]
    if raw.startswith("-") or (words and words[-1] in _VALUE_OPTIONS):
        return None
    for i, word in enumerate(words):
        is_value = i > 0 and words[i - 1] in _VALUE_OPTIONS
        if not word.startswith("-") and not is_value:
            return None  # the key is already there
    return raw, fragment


class KeyCompleter:
    """Completes keys after ``%dm_pull``, ``%dm_info``, ``%dm_delete`` and ``%%dm_cache``,
    one '/'-part at a time like paths (``te`` -> ``team/``).

    The first TAB in a level lists that level (``Manager.ls_level``: one request, however
    many keys lie below it); the listing stays in the manager's listing cache (LISTING_TTL
    seconds, shared with the panel and fed by ``%dm_ls``), so each further keystroke only
    filters it. A level longer than one page is narrowed on the store's side to the names
    starting with what is typed. A failed listing (not configured, unreachable) completes
    nothing for LISTING_TTL seconds, so that TAB does not wait on a dead store each time."""

    def __init__(self) -> None:
        self._quiet: tuple[Manager, float] | None = None  # (manager, when it failed)

    def complete(self, fragment: str) -> list[str]:
        """Completions of ``fragment``, each up to the next '/' after it (inclusive)."""
        try:
            manager = api.get_manager()
        except DamanError:
            return []
        listings = manager.listings
        if self._quiet is not None:
            failed_on, when = self._quiet
            if failed_on is manager and listings.clock() - when < listings.ttl:
                return []
            self._quiet = None
        try:
            names = self._names(manager, fragment)
        except DamanError:
            self._quiet = (manager, listings.clock())
            return []
        found = set()
        for name in names:
            if name.startswith(fragment):
                slash = name.find("/", len(fragment))
                found.add(name if slash < 0 else name[: slash + 1])
        return sorted(found)

    @staticmethod
    def _names(manager: Manager, fragment: str) -> list[str]:
        """The names (keys and sub-prefixes) of a listing holding every name that starts
        with ``fragment``: one already at hand if any, else a new one."""
        level = fragment[: fragment.rfind("/") + 1]
        for end in range(len(level), len(fragment) + 1):
            held = manager.listings.get(fragment[:end], None, LEVEL_PAGE)
            if held is not None and held.token is None:
                return [*held.prefixes, *(info.key for info in held.objects)]
        page = manager.ls_level(level, limit=LEVEL_PAGE)
        if page.token is not None and fragment != level:
            page = manager.ls_level(fragment, limit=LEVEL_PAGE)
        return [*page.prefixes, *(item.key for item in page.keys)]

    @staticmethod
    def quoted(completions: list[str], raw: str) -> list[str]:
        """``completions`` as they are to be typed after ``raw``: quoted when the user opened
        a quote or the key holds spaces or quotes (the magics split their line as a shell
        does); a whole key's quote is closed, a prefix's stays open for the next TAB."""
        typed = []
        for name in completions:
            quote = raw[:1] if raw[:1] in ("'", '"') else ""
            if not quote and any(c.isspace() or c in "'\"" for c in name):
                quote = "'" if '"' in name else '"'
            close = quote if quote and not name.endswith("/") else ""
            typed.append(f"{quote}{name}{close}")
        return typed

    # Priority 1: asked before the built-in matchers (priority 0), which it then suppresses.
    @context_matcher(priority=1)
    def matcher(self, context: CompletionContext) -> SimpleMatcherResult:
        found = key_fragment(context.text_until_cursor, context.cursor_line == 0)
        if found is None:
            return {"completions": []}
        raw, fragment = found
        typed = self.quoted(self.complete(fragment), raw)
        return {
            "completions": [SimpleCompletion(k, type="daman key") for k in typed],
            "matched_fragment": raw,
            "suppress": True,  # file and Python-name completions make no sense for a key
            "ordered": True,
        }


# -- the magics ------------------------------------------------------------------------------


@magics_class
class DamanMagics(Magics):
    """The ``%dm_`` magics, on the default manager (``dm.get_manager()``)."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.completer = KeyCompleter()

    @line_magic
    @no_var_expand  # --meta is Python code: "{'rows': n}" must reach it as written
    @magic_arguments()
    @argument("var", help="the variable to push")
    @argument("--key", help="where to store it (default: the variable's name)")
    @argument(
        "--meta",
        metavar="EXPR",
        help="a Python expression evaluated in your namespace and stored with the object; "
        "quote it if it has spaces: --meta \"{'rows': len(df)}\"",
    )
    @argument("--force", action="store_true", help="overwrite the key if it exists")
    @argument("--persist", action="store_true", help="pin the local copy against eviction")
    @_one_line_errors
    def dm_push(self, line: str) -> None:
        """Push a variable of your namespace to the store (``dm.push``)."""
        args = _parse(self.dm_push, line)
        _check_identifier(args.var, "VAR")
        if args.var not in self.shell.user_ns:
            raise InvalidArgumentError(f"no variable named {args.var!r}; nothing was pushed.")
        meta = None
        if args.meta is not None:
            try:
                meta = self.shell.ev(args.meta)
            except Exception as exc:
                raise InvalidArgumentError(
                    f"--meta {args.meta!r} raised {type(exc).__name__}: {exc}; nothing was pushed."
                ) from None
        key = args.key or args.var
        info = api.get_manager().push(
            self.shell.user_ns[args.var], key, meta=meta, force=args.force, persist=args.persist
        )
        print(report.pushed_line(key, info.size, var=args.var))

    @line_magic
    @magic_arguments()
    @argument("key", help="the key to pull")
    @argument(
        "--as",
        dest="var",
        metavar="VAR",
        help="the variable to set (default: the key's last part); VAR_meta gets the meta",
    )
    @argument("--force", action="store_true", help="download even if the cached copy is current")
    @argument("--persist", action="store_true", help="pin the local copy against eviction")
    @argument("--memory-only", action="store_true", help="load it without keeping a local copy")
    @argument(
        "--mmap",
        action="store_true",
        help="map its numpy arrays read-only from the cached file (zero-copy); np.array(x) "
        "makes a writable copy",
    )
    @argument("--version", metavar="ID", help="an older version (an id from %%dm_history)")
    @_one_line_errors
    def dm_pull(self, line: str) -> Any:
        """Pull a key into a variable (and its meta into VAR_meta); ``x = %dm_pull KEY`` also
        works (``dm.pull``)."""
        args = _parse(self.dm_pull, line)
        if args.var is not None:
            _check_identifier(args.var, "--as")
        bare = _is_bare_statement(self.shell, "dm_pull", line)  # before the namespace changes
        pulled = api.get_manager().load(
            args.key,
            force=args.force,
            persist=args.persist,
            memory_only=args.memory_only,
            mmap=args.mmap,
            version=args.version,
        )
        var = args.var or variable_name(args.key)
        if not var:
            raise UsageError(
                f"{args.key!r} gives no Python name to bind; name the variable: "
                f"%dm_pull {shlex.quote(args.key)} --as NAME"
            )
        self.shell.push({var: pulled.obj, f"{var}_meta": pulled.meta})
        print(report.loaded_line(args.key, pulled.source, pulled.size, var))
        return None if bare else pulled.obj

    @line_magic
    @magic_arguments()
    @argument("prefix", nargs="?", default="", help="list only keys starting with this")
    @argument("--legacy", action="store_true", help="mark daman 0.2 objects (one read per key)")
    @_one_line_errors
    def dm_ls(self, line: str) -> None:
        """The keys in the store with size, last modified and whether cached or persisted
        here; the same table as ``dm_ls --long``."""
        args = _parse(self.dm_ls, line)
        manager = api.get_manager()
        listing = manager.ls(args.prefix, legacy=args.legacy)
        if not listing:
            print(report.empty_listing_line(args.prefix, manager.store.describe()))
            return
        _show(self.shell, report.listing_lines(listing), report.listing_html(listing))

    @line_magic
    @magic_arguments()
    @argument("key", help="the key to describe")
    @_one_line_errors
    def dm_info(self, line: str) -> None:
        """Meta, size, sha256, who pushed it and when, without downloading it; the same fields
        as ``dm_info``."""
        args = _parse(self.dm_info, line)
        details = api.get_manager().info(args.key)
        _show(self.shell, report.details_lines(details), report.details_html(details))

    @line_magic
    @magic_arguments()
    @argument("key", help="the key whose versions to list")
    @_one_line_errors
    def dm_history(self, line: str) -> None:
        """A key's versions, newest first, the current one marked * (the same as
        ``dm_history``); pull one with ``%dm_pull KEY --version ID``."""
        args = _parse(self.dm_history, line)
        print("\n".join(report.history_lines(api.get_manager().history(args.key))))

    @line_magic
    @magic_arguments()
    @argument("key", help="the key to delete")
    @argument("--remote", action="store_true", help="also delete it from the store, for everyone")
    @_one_line_errors
    def dm_delete(self, line: str) -> None:
        """Remove a key's local copy; with --remote the stored object too (``dm.delete``)."""
        args = _parse(self.dm_delete, line)
        deleted = api.get_manager().delete(args.key, local=True, remote=args.remote)
        print(report.deleted_line(deleted))

    @line_magic
    @magic_arguments()
    @argument("--json", action="store_true", help="print JSON, as dm_status --json does")
    @_one_line_errors
    def dm_status(self, line: str) -> None:
        """The store in use, the local cache's use against its allocation and the persisted
        entries (the same as ``dm_status``; asks nothing of the store)."""
        args = _parse(self.dm_status, line)
        manager = api.get_manager()
        usage, mapped, local_dir = manager.usage(), manager.mapped(), manager.cache.root
        if args.json:
            data = {**report.usage_data(usage, local_dir), "mapped": report.mapped_data(mapped)}
            print(report.to_json(data))
            return
        lines = report.usage_lines(usage, local_dir) + report.mapped_lines(mapped)
        _show(self.shell, lines, report.usage_html(usage, local_dir, mapped))

    @line_magic
    @magic_arguments()
    @_one_line_errors
    def dm_panel(self, line: str) -> Any:
        """The daman panel (``dm.panel()``): browse the store a level at a time, see this
        machine's disc use against its allocation, pin, pull and delete keys."""
        _parse(self.dm_panel, line)
        return api.panel()

    @cell_magic
    @magic_arguments()
    @argument("key", help="where the cell's variables are stored")
    @argument("vars", nargs="+", metavar="VAR", help="the variables the cell computes")
    @_one_line_errors
    def dm_cache(self, line: str, cell: str) -> None:
        """If KEY is in the store, set the VARs from it without running the cell; otherwise
        run the cell and push the VARs under KEY. Delete the key (%dm_delete KEY --remote)
        to compute the cell again."""
        args = _parse(self.dm_cache, line)
        for var in args.vars:
            _check_identifier(var, "VAR")
        manager = api.get_manager()
        found = manager.cached_cell(args.key, args.vars)
        if found is not None:
            values, pulled = found
            self.shell.push(values)
            print(report.cell_cached_line(args.key, args.vars, pulled.source, pulled.size))
            return
        before = {var: self.shell.user_ns[var] for var in args.vars if var in self.shell.user_ns}
        if not self.shell.run_cell(cell, store_history=False).success:
            raise InvalidArgumentError(f"the cell failed; nothing was pushed to {args.key!r}.")
        info = manager.push_cell(
            args.key,
            args.vars,
            before=before,
            after=self.shell.user_ns,
            code=self.shell.transform_cell(cell),
            cell=cell,
        )
        print(report.cell_pushed_line(args.key, args.vars, info.size))


# -- the extension ---------------------------------------------------------------------------


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics and the key completer; loading twice is harmless."""
    if "DamanMagics" in ipython.magics_manager.registry:
        return
    magics = DamanMagics(ipython)
    ipython.register_magics(magics)
    ipython.Completer.custom_matchers.append(magics.completer.matcher)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove what :func:`load_ipython_extension` registered."""
    magics = ipython.magics_manager.registry.pop("DamanMagics", None)
    if magics is None:
        return
    for kind, names in magics.magics.items():
        table = ipython.magics_manager.magics[kind]
        for name in names:
            if getattr(table.get(name), "__self__", None) is magics:
                del table[name]
    matchers = ipython.Completer.custom_matchers
    if magics.completer.matcher in matchers:
        matchers.remove(magics.completer.matcher)
