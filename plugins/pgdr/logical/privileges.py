"""Owners, grants and the database's own settings: what a restore gives back once the data is proven good.

A dump holds more than rows: who owns each object, the ``GRANT``s on it, ``ALTER DEFAULT
PRIVILEGES``, the database's settings (``ALTER DATABASE … SET``, ``ALTER ROLE … IN DATABASE …
SET``), its own grants, comment and connection limit, its encoding and locale, and objects only a
superuser may create (event triggers, ``FOR ALL TABLES`` publications). An application needs all
of it: with the rows alone its first query gets ``permission denied``.

pgdr restores in two steps, so that no restored code ever runs with more rights than the restore role:

1. the data and schema, as the non-superuser restore role (``--no-owner --no-acl``), without the
   superuser-only objects and without row-level security switched on (:func:`data_restore_list`);
   every check runs on that copy, so it counts and validates every row;
2. after the checks, :func:`apply_privileges`, as the server's own connection: row-level security
   switched on again, the owners, the grants and default privileges, the database's properties, then
   the superuser-only objects. These are statements that run no restored code (``ALTER TABLE …
   ENABLE ROW LEVEL SECURITY``, ``ALTER … OWNER TO``, ``GRANT``, ``REVOKE``, ``ALTER DEFAULT
   PRIVILEGES``, ``ALTER DATABASE``); each is checked to be one of them before it runs, and event
   triggers are created last, so none fires while pgdr works.

Everything comes from the dump's table of contents (``toc.dat``), through ``pg_restore`` itself:
the owner statements are exactly the lines ``pg_restore`` adds to its script when it is not told
``--no-owner`` (found by comparing the two scripts line by line, so no text inside a function body
can pass for one). Subscriptions are never restored: on a copy they would start replicating.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pgdr.errors import PermanentFailure
from pgdr.identifiers import printable
from pgdr.postgres.client import PgEndpoint, connect, connection_args, pg_tool, run_tool

log = logging.getLogger(__name__)

# Objects a non-superuser cannot create (CREATE EVENT TRIGGER; CREATE PUBLICATION ... FOR ALL TABLES or
# TABLES IN SCHEMA; CREATE SUBSCRIPTION). A publication's tables go with it.
SUPERUSER_ONLY = ("EVENT TRIGGER", "PUBLICATION", "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA")
NEVER_RESTORED = ("SUBSCRIPTION", "SUBSCRIPTION TABLE")
PRIVILEGE_ENTRIES = ("ACL", "DEFAULT ACL")
# ALTER TABLE … ENABLE ROW LEVEL SECURITY: switched on after the checks. Before, a table with FORCE ROW LEVEL SECURITY
# (kept with the table itself) would show its owner, the restore role, only the rows a policy lets it see: the exact
# row counts would fail a good backup, and validation would read a part of the data. The policies are restored as
# usual: they do nothing until it is switched on.
AFTER_CHECKS = ("ROW SECURITY",)
# What the restore role's pg_restore leaves out: the superuser-only objects, what is never restored, what comes after.
NOT_BY_THE_RESTORE_ROLE = (*SUPERUSER_ONLY, *NEVER_RESTORED, *AFTER_CHECKS)
# What the plan's skip_objects may leave out of a restored copy (subscriptions are never restored anyway).
SKIPPABLE = {
    "publications": ("PUBLICATION", "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA"),
    "event_triggers": ("EVENT TRIGGER",),
    "subscriptions": (),
}

# "<dump id>; <catalog oid> <oid> <desc> ...": the desc words are PostgreSQL's fixed set; longest first,
# so "PUBLICATION TABLES IN SCHEMA" is not read as "PUBLICATION".
_DESCS = sorted({*SUPERUSER_ONLY, *NEVER_RESTORED, *PRIVILEGE_ENTRIES, *AFTER_CHECKS}, key=len, reverse=True)
_ENTRY = re.compile(r"^(?P<id>\d+); \d+ \d+ (?P<desc>" + "|".join(re.escape(d) for d in _DESCS) + r") ")
_ANY_ENTRY = re.compile(r"^(?P<id>\d+); \d+ \d+ ")
_EXTENSION_ENTRY = re.compile(r"^\d+; \d+ \d+ (?:EXTENSION - |COMMENT - EXTENSION )")
_SCHEMA_ENTRY = re.compile(r"^\d+; \d+ \d+ SCHEMA ")
_DATA_ENTRY = re.compile(r"^\d+; \d+ \d+ (TABLE DATA|BLOBS|MATERIALIZED VIEW DATA|STATISTICS DATA|SEQUENCE SET) ")
_DBNAME = re.compile(r"^;\s+dbname: (?P<name>.*)$")


class PrivilegesFailed(PermanentFailure):
    """The owners, grants or database properties of a backup could not be applied to the restored copy."""


class MissingRoles(PermanentFailure):
    """The backup names roles (owners, grantees) that the target server does not have."""


@dataclass(frozen=True)
class DumpToc:
    """The table of contents of a directory-format dump, as ``pg_restore --list`` gives it."""

    dump_dir: Path
    lines: tuple[str, ...]  # every entry line
    database_lines: tuple[
        str, ...
    ]  # the entries only --create restores: the database itself, its grants, comment, settings
    source_dbname: str

    def entries(self, *descs: str) -> list[str]:
        """Return the entry lines whose type is one of ``descs``."""
        return [line for line in self.lines if (m := _ENTRY.match(line)) and m.group("desc") in descs]

    def described(self, *descs: str) -> list[str]:
        """Return ``"<type> <name>"`` for the entries of ``descs``, for reports."""
        return [printable(_ANY_ENTRY.sub("", line, count=1)) for line in self.entries(*descs)]


def read_toc(dump_dir: Path, env: dict[str, str] | None = None) -> DumpToc:
    """List ``dump_dir``'s table of contents (``toc.dat`` is the only file read)."""
    plain = _run([pg_tool("pg_restore"), "--list", str(dump_dir)], env)
    created = _run([pg_tool("pg_restore"), "--list", "--create", str(dump_dir)], env)
    lines = [line for line in plain.splitlines() if _ANY_ENTRY.match(line)]
    known = set(lines)
    database_lines = [line for line in created.splitlines() if _ANY_ENTRY.match(line) and line not in known]
    name = next((m.group("name") for line in plain.splitlines() if (m := _DBNAME.match(line))), "")
    return DumpToc(dump_dir, tuple(lines), tuple(database_lines), name)


def _run(args: list[str], env: dict[str, str] | None, what: str = "pg_restore") -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise PrivilegesFailed(f"{what} could not read the backup's table of contents: {result.stderr.strip()[-500:]}")
    return result.stdout


def data_restore_list(toc: DumpToc) -> str:
    """Return the ``--use-list`` for the restore as the restore role: everything but superuser-only objects and what
    is done after the checks (:data:`AFTER_CHECKS`)."""
    left_out = set(toc.entries(*NOT_BY_THE_RESTORE_ROLE))
    return "\n".join(line for line in toc.lines if line not in left_out) + "\n"


def _script(toc: DumpToc, lines: list[str], workdir: Path, name: str, *options: str, env=None) -> str:
    """Return ``pg_restore``'s SQL script for the entries ``lines`` of the dump."""
    listing = workdir / f"{name}.list"
    listing.write_text("\n".join(lines) + "\n")
    return _run([pg_tool("pg_restore"), "--file=-", f"--use-list={listing}", *options, str(toc.dump_dir)], env)


def _schema_entries(toc: DumpToc) -> list[str]:
    """The entries restored as the restore role but the data (large objects' metadata is in the data section: kept,
    the rows are not)."""
    return [line for line in data_restore_list(toc).splitlines() if line and not _DATA_ENTRY.match(line)]


# pg_restore's options for the schema script with neither owners nor grants: what owners and tablespaces are found
# against, one option at a time.
_PLAIN = ("--no-acl", "--no-owner")


def _plain_script(toc: DumpToc, objects: list[str], workdir: Path, env=None) -> str:
    """Return ``pg_restore``'s script of ``objects`` with neither owners nor grants (see :data:`_PLAIN`)."""
    return _script(toc, objects, workdir, "plain", *_PLAIN, env=env)


def owner_statements(toc: DumpToc, workdir: Path, env=None, *, plain: str | None = None) -> list[str]:
    """Return the ``ALTER … OWNER TO`` statements of every object restored as the restore role.

    They are the lines ``pg_restore`` adds when it restores owners: its script with owners and
    without are compared line by line, so only lines it wrote itself are taken, never text inside
    a function body or a view.

    :param plain: the script without owners (:func:`_plain_script`), when the caller made it already.
    """
    objects = _schema_entries(toc)
    with_owners = _script(toc, objects, workdir, "owners", "--no-acl", env=env)
    without = _plain_script(toc, objects, workdir, env) if plain is None else plain
    return _added_statements(with_owners, without, "ALTER ")


def _added_statements(script: str, without: str, start: str) -> list[str]:
    """Return the statements beginning with ``start`` that ``pg_restore`` added to ``script``, the same script as
    ``without`` but for one option: lines only ``script`` has, compared line by line."""
    a = [line for line in script.splitlines() if line.strip()]
    b = [line for line in without.splitlines() if line.strip()]
    found, i, j = [], 0, 0
    while i < len(a):
        if j < len(b) and a[i] == b[j]:
            i, j = i + 1, j + 1
        elif a[i].startswith(start):  # a line only the first script has: a statement pg_restore wrote
            chunk = []
            while i < len(a):  # one line, unless a name holds a line break
                chunk.append(a[i])
                i += 1
                if chunk[-1].endswith(";"):
                    break
            found.append("\n".join(chunk))
        else:  # the same line with the option's effect in it (the entry's header comment), or a \restrict key
            i, j = i + 1, j + 1
    return found


def named_tablespaces(toc: DumpToc, workdir: Path, env=None, *, plain: str | None = None) -> set[str]:
    """Return the tablespaces the dump's tables, indexes and materialized views were in (the source database's own
    default tablespace is never named).

    Found as :func:`owner_statements` finds owners: the ``SET default_tablespace`` lines only the script with
    tablespaces has (its entries' header comments differ too and are passed over), never text in a function body.

    :param plain: the script with them (:func:`_plain_script`), when the caller made it already.
    """
    objects = _schema_entries(toc)
    if not objects:
        return set()
    with_them = _plain_script(toc, objects, workdir, env) if plain is None else plain
    without = _script(toc, objects, workdir, "tablespaces", *_PLAIN, "--no-tablespaces", env=env)
    values = [statements(s)[0][-1] for s in _added_statements(with_them, without, "SET default_tablespace = ")]
    return {value.value for value in values if value.kind in ("ident", "word")}  # '' is the database's default


@dataclass(frozen=True)
class DumpExtension:
    """An extension a dump creates, read from ``pg_restore``'s script (never run)."""

    name: str
    schema: str
    comment: str | None  # the dump's COMMENT ON EXTENSION, when it has one
    entries: tuple[str, ...]  # its table-of-contents lines: the extension, its comment


def schema_entries(toc: DumpToc) -> list[str]:
    """The dump's ``SCHEMA`` entries (each a plain ``CREATE SCHEMA``)."""
    return [line for line in toc.lines if _SCHEMA_ENTRY.match(line)]


def dump_extensions(toc: DumpToc, workdir: Path, env=None) -> list[DumpExtension]:
    """Return the extensions the dump creates, in its order, with the schema each goes in.

    Read from ``pg_restore``'s script of their entries with the SQL tokenizer, so names are unquoted as
    PostgreSQL would; a statement of another shape than ``pg_dump`` writes is passed over (that extension is left
    to the restore, which then says what fails).
    """
    lines = [line for line in toc.lines if _EXTENSION_ENTRY.match(line)]
    if not lines:
        return []
    created, comments = [], {}
    for statement in statements(_script(toc, lines, workdir, "extensions", *_PLAIN, env=env)):
        if _starts(statement, ("CREATE", "EXTENSION")):
            rest = statement[5:] if _starts(statement[2:], ("IF", "NOT", "EXISTS")) else statement[2:]
            at = next((k for k, t in enumerate(rest) if t.is_word("SCHEMA")), None)
            names = [rest[0], rest[at + 1]] if rest and at is not None and at + 1 < len(rest) else []
            if names and all(t.kind in ("ident", "word") for t in names):
                created.append((names[0].value, names[1].value))
        elif _starts(statement, ("COMMENT", "ON", "EXTENSION")) and len(statement) == 6 and statement[4].is_word("IS"):
            text = statement[5].text
            if statement[3].kind in ("ident", "word") and text.startswith("'") and text.endswith("'"):
                comments[statement[3].value] = text[1:-1].replace("''", "'")
    tags = {_ANY_ENTRY.sub("", line).rstrip(): line for line in lines}
    return [
        DumpExtension(
            name,
            schema,
            comments.get(name),
            tuple(tags[tag] for tag in (f"EXTENSION - {name}", f"COMMENT - EXTENSION {name}") if tag in tags),
        )
        for name, schema in created
    ]


# -- SQL tokens ---------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*|/\*.*?\*/)
    | (?P<ident>"(?:[^"]|"")*")
    | (?P<string>[Ee]?'(?:[^']|'')*')
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$)
    | (?P<word>[A-Za-z_\u0080-\uffff][A-Za-z_0-9$\u0080-\uffff]*)
    | (?P<number>\d+(?:\.\d+)?)
    | (?P<meta>\\[^\n]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str

    @property
    def value(self) -> str:
        """The name an identifier token stands for (quotes removed, bare words folded to lower case)."""
        if self.kind == "ident":
            return self.text[1:-1].replace('""', '"')
        return self.text.lower() if self.kind == "word" else self.text

    def is_word(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words


def tokens(text: str) -> Iterator[Token]:
    """Split SQL text into tokens; string literals, quoted names and dollar-quoted bodies stay whole."""
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        kind = match.lastgroup if match.lastgroup != "tag" else "dollar"
        if kind == "dollar":  # a dollar-quoted string: up to the same tag
            end = text.find(match.group(0), match.end())
            end = len(text) if end < 0 else end + len(match.group(0))
            yield Token("string", text[pos:end])
            pos = end
            continue
        yield Token(kind, match.group(0))
        pos = match.end()


def statements(script: str) -> list[list[Token]]:
    """Split a ``pg_restore`` script into statements (tokens without spaces and comments); psql's
    backslash commands are dropped (a ``\\connect`` or ``\\restrict`` line is not SQL)."""
    result, current = [], []
    for token in tokens(script):
        if token.kind in ("space", "comment", "meta"):
            continue
        if token.kind == "punct" and token.text == ";":
            if current:
                result.append(current)
            current = []
            continue
        current.append(token)
    if current:
        result.append(current)
    return result


def render(statement: list[Token]) -> str:
    return " ".join(t.text for t in statement) + ";"


def _role_list(toks: list[Token]) -> list[str]:
    """Read ``role [, role ...]`` from the start of ``toks`` (``PUBLIC`` is not a role)."""
    roles = []
    for token in toks:
        if token.kind == "ident" or (
            token.kind == "word" and not token.is_word("PUBLIC", "CURRENT_USER", "SESSION_USER", "CURRENT_ROLE")
        ):
            if token.kind == "word" and token.is_word("WITH", "GRANTED", "CASCADE", "RESTRICT", "USING"):
                break
            roles.append(token.value)
        elif token.kind == "punct" and token.text == ",":
            continue
        elif token.is_word("PUBLIC", "CURRENT_USER", "SESSION_USER", "CURRENT_ROLE"):
            continue
        else:
            break
    return roles


def _top_level_index(statement: list[Token], word: str, start: int = 0) -> int | None:
    depth = 0
    for k in range(start, len(statement)):
        token = statement[k]
        if token.kind == "punct" and token.text == "(":
            depth += 1
        elif token.kind == "punct" and token.text == ")":
            depth -= 1
        elif depth == 0 and token.is_word(word):
            return k
    return None


def roles_in(statement: list[Token]) -> set[str]:
    """Return the roles one owner, grant, default-privilege, policy or role-setting statement names."""
    if not statement:
        return set()
    roles: set[str] = set()
    first = statement[0]
    if first.is_word("GRANT", "REVOKE") or (
        first.is_word("ALTER") and len(statement) > 2 and statement[1].is_word("DEFAULT")
    ):
        if len(statement) > 4 and statement[1].is_word("DEFAULT") and statement[3].is_word("FOR"):
            roles.update(_role_list(statement[5:6]))  # FOR ROLE x
        for word in ("TO", "FROM"):
            k = _top_level_index(statement, word)
            if k is not None:
                roles.update(_role_list(statement[k + 1 :]))
        k = _top_level_index(statement, "GRANTED")
        if k is not None:
            roles.update(_role_list(statement[k + 2 :]))
    elif (
        first.is_word("ALTER") and len(statement) > 3 and statement[-3].is_word("OWNER") and statement[-2].is_word("TO")
    ):
        roles.update(_role_list(statement[-1:]))
    elif first.is_word("ALTER") and len(statement) > 2 and statement[1].is_word("ROLE"):
        roles.update(_role_list(statement[2:3]))
    elif first.is_word("CREATE") and len(statement) > 1 and statement[1].is_word("POLICY"):
        k = _top_level_index(statement, "TO")
        if k is not None:
            roles.update(_role_list(statement[k + 1 :]))
    return roles


# -- what a restore needs of the target server -------------------------------------------------------

DATABASE_OPTIONS = (
    "ENCODING",
    "LOCALE_PROVIDER",
    "LOCALE",
    "LC_COLLATE",
    "LC_CTYPE",
    "ICU_LOCALE",
    "ICU_RULES",
    "BUILTIN_LOCALE",
)


@dataclass
class BackupNeeds:
    """What the backup needs from the server it is restored to."""

    roles: set[str] = field(default_factory=set)
    tablespaces: set[str] = field(default_factory=set)  # where the source had tables and indexes (besides its default)
    extensions_in_dump: list[DumpExtension] = field(default_factory=list)  # in the dump's order
    database_options: dict[str, str] = field(
        default_factory=dict
    )  # CREATE DATABASE option -> value, as the source had them
    superuser_objects: list[str] = field(default_factory=list)
    skipped_objects: list[str] = field(default_factory=list)

    @property
    def extensions(self) -> list[str]:
        """The names of every extension the dump creates, in its order."""
        return [extension.name for extension in self.extensions_in_dump]

    def to_dict(self) -> dict:
        return {
            "roles": sorted(self.roles),
            "tablespaces": sorted(self.tablespaces),
            "extensions": self.extensions,
            "database_options": self.database_options,
            "superuser_objects": self.superuser_objects,
            "skipped_objects": self.skipped_objects,
        }


def backup_needs(toc: DumpToc, workdir: Path, env=None) -> BackupNeeds:
    """Read what a backup needs of its target: roles, tablespaces, the database's encoding and locale, superuser
    objects."""
    plain = _plain_script(toc, _schema_entries(toc), workdir, env)  # what owners and tablespaces are both found against
    needs = BackupNeeds(
        superuser_objects=toc.described(*SUPERUSER_ONLY),
        skipped_objects=toc.described(*NEVER_RESTORED),
        tablespaces=named_tablespaces(toc, workdir, env, plain=plain),
        extensions_in_dump=dump_extensions(toc, workdir, env),
    )
    for statement in owner_statements(toc, workdir, env, plain=plain):
        needs.roles |= roles_in(statements(statement)[0])
    acl = (
        toc.entries(*PRIVILEGE_ENTRIES) + [line for line in toc.lines if " POLICY " in line] + list(toc.database_lines)
    )
    if acl:
        for statement in statements(_script(toc, acl, workdir, "needs", "--create", env=env)):
            needs.roles |= roles_in(statement)
            if statement[0].is_word("CREATE") and len(statement) > 1 and statement[1].is_word("DATABASE"):
                needs.database_options = _create_options(statement)
    needs.roles = {r for r in needs.roles if not r.startswith("pg_")}  # predefined roles exist on every server
    return needs


def _create_options(statement: list[Token]) -> dict[str, str]:
    """Read ``NAME = value`` options of ``CREATE DATABASE`` (the ones that shape the data; never TEMPLATE or OWNER)."""
    options = {}
    for k in range(len(statement) - 2):
        name, eq, value = statement[k], statement[k + 1], statement[k + 2]
        if name.kind == "word" and name.text.upper() in DATABASE_OPTIONS and eq.text == "=":
            options[name.text.upper()] = value.text[1:-1].replace("''", "'") if value.kind == "string" else value.text
    return options


def create_options_sql(options: dict[str, str]):
    """Return the ``CREATE DATABASE`` options clause for ``options`` (:attr:`BackupNeeds.database_options`)."""
    from psycopg import sql

    parts = []
    for name in DATABASE_OPTIONS:
        if name in options:
            value = options[name]
            if name == "LOCALE_PROVIDER":
                if value.lower() not in ("libc", "icu", "builtin"):
                    raise PrivilegesFailed(
                        f"The backup's database has an unknown locale provider {printable(value)!r}."
                    )
                parts.append(sql.SQL("LOCALE_PROVIDER {}").format(sql.SQL(value.lower())))
            else:
                parts.append(sql.SQL(name + " {}").format(sql.Literal(value)))
    return sql.SQL(" ").join(parts)


def server_roles(server: PgEndpoint) -> set[str]:
    with connect(server.with_dbname("postgres")) as conn:
        return {row[0] for row in conn.execute("SELECT rolname FROM pg_roles").fetchall()}


def missing_extensions(needs: BackupNeeds, server: PgEndpoint) -> list[str]:
    """Return the extensions the backup creates that ``server`` does not have installed (no control file), sorted."""
    if not needs.extensions:
        return []
    with connect(server.with_dbname("postgres")) as conn:
        available = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM pg_catalog.pg_available_extensions WHERE name = ANY(%s)", (needs.extensions,)
            )
        }
    return sorted(set(needs.extensions) - available)


def missing_roles(needs: BackupNeeds, server: PgEndpoint) -> list[str]:
    """Return the roles the backup names that ``server`` lacks, sorted."""
    return sorted(needs.roles - server_roles(server))


ROLE_MARKER = "pgdr: created for a restore"


# Role attributes a restore never gives on its own: they make a role more than an owner or a login.
_WITHHELD = {"SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS"}


@dataclass
class RoleDefinitions:
    """What ``pg_dumpall --globals-only`` of the source server says about some roles (see :func:`role_definitions`)."""

    attributes: dict[str, list[Token]] = field(default_factory=dict)  # role -> the tokens after ALTER ROLE r WITH
    memberships: list[tuple[str, str, list[Token]]] = field(default_factory=list)  # (role, member, options)
    settings: list[tuple[str, list[Token]]] = field(default_factory=list)  # (role, tokens of ALTER ROLE r SET ...)


def role_definitions(globals_sql: str) -> RoleDefinitions:
    """Read roles, their attributes, memberships and settings from ``pg_dumpall --globals-only`` output."""
    found = RoleDefinitions()
    for st in statements(globals_sql):
        if _starts(st, ("ALTER", "ROLE")) and len(st) > 3 and st[3].is_word("WITH"):
            found.attributes[st[2].value] = st[4:]
        elif _starts(st, ("ALTER", "ROLE")) and len(st) > 3 and st[3].is_word("SET"):
            found.settings.append((st[2].value, st[3:]))
        elif _starts(st, ("GRANT",)) and len(st) > 3 and st[2].is_word("TO") and _top_level_index(st, "ON") is None:
            end = next((k for k in range(4, len(st)) if st[k].is_word("GRANTED")), len(st))
            found.memberships.append((st[1].value, st[3].value, st[4:end]))
    return found


def _attribute_sql(tokens: list[Token], with_passwords: bool) -> tuple[str, list[str]]:
    """Return the attributes clause to apply, and the withheld attributes' names."""
    kept, withheld, k = [], [], 0
    while k < len(tokens):
        token = tokens[k]
        if token.is_word("PASSWORD"):
            if with_passwords and k + 1 < len(tokens) and tokens[k + 1].kind == "string":
                kept += [token.text, tokens[k + 1].text]
            k += 2
            continue
        if token.kind == "word" and token.text.upper() in _WITHHELD:
            withheld.append(token.text.upper())
        elif token.kind in ("word", "string", "number"):
            kept.append(token.text)
        k += 1
    return " ".join(kept), withheld


def create_roles(
    server: PgEndpoint, roles: list[str], why: str, globals_sql: str | None = None, with_passwords: bool = False
) -> list[str]:
    """Create ``roles`` on ``server``, marked as pgdr's; return those created. An existing role is never changed.

    With the source server's ``pg_dumpall --globals-only`` (stored in every backup), each is created
    as it was there: ``LOGIN``, ``INHERIT``, ``CREATEDB``, connection limit, its settings, and its
    memberships in roles that exist; password hashes only ``with_passwords``. ``SUPERUSER``,
    ``CREATEROLE``, ``REPLICATION`` and ``BYPASSRLS`` are never given (a person decides that); without the file
    (older backups) roles are created ``NOLOGIN``.
    """
    from psycopg import sql

    definitions = role_definitions(globals_sql) if globals_sql else RoleDefinitions()
    created, withheld = [], {}
    with connect(server.with_dbname("postgres")) as conn:
        for role in roles:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                continue
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(role), sql.Literal(f"{ROLE_MARKER}: {why}"))
            )
            created.append(role)
        existing = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
        for role in created:
            if role in definitions.attributes:
                clause, held = _attribute_sql(definitions.attributes[role], with_passwords)
                if clause:
                    conn.execute(sql.SQL("ALTER ROLE {} WITH ").format(sql.Identifier(role)) + sql.SQL(clause))
                if held:
                    withheld[role] = held
        for role, tokens in definitions.settings:
            if role in created:
                conn.execute(
                    sql.SQL("ALTER ROLE {} ").format(sql.Identifier(role)) + sql.SQL(" ".join(t.text for t in tokens))
                )
        for granted, member, options in definitions.memberships:  # only the new roles' own memberships
            if member in created and granted in existing:
                conn.execute(
                    sql.SQL("GRANT {} TO {} ").format(sql.Identifier(granted), sql.Identifier(member))
                    + sql.SQL(" ".join(t.text for t in options))
                )
    if created:
        log.warning(
            "Created %d role(s) the backup needs: %s (%s). %s",
            len(created),
            ", ".join(printable(role) for role in created),
            "as on the source server, " + ("with" if with_passwords else "without") + " passwords"
            if globals_sql
            else "NOLOGIN: this backup holds no role definitions",
            "; ".join(f"{printable(r)}: {', '.join(a)} not given" for r, a in withheld.items()),
        )
    return created


def drop_created_roles(server: PgEndpoint, why: str) -> list[str]:
    """Drop the roles :func:`create_roles` made on ``server`` for ``why`` that nothing uses any more; return those
    dropped.

    Found by their marker, not by a list handed over: a restore that failed after creating them
    returned nothing, and its roles still go. A role still owning or granted something in another
    database is kept (``DROP ROLE`` refuses), and said.
    """
    from psycopg import sql

    dropped = []
    with connect(server.with_dbname("postgres")) as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_roles WHERE shobj_description(oid, 'pg_authid') = %s ORDER BY rolname",
            (f"{ROLE_MARKER}: {why}",),
        ).fetchall()
        for (role,) in rows:
            try:
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
                dropped.append(role)
            except Exception as err:  # noqa: BLE001 - still used by another database: kept, said
                log.info("Keeping role %s: %s", role, str(err).splitlines()[0])
    return dropped


# -- the privileges phase ----------------------------------------------------------------------------


@dataclass
class PrivilegesReport:
    """What the privileges phase applied to a restored copy."""

    owners: int = 0
    row_security: int = 0  # tables whose row-level security was switched on again
    grants: int = 0
    default_privileges: int = 0
    database_properties: int = 0
    superuser_objects: list[str] = field(default_factory=list)
    skipped_objects: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_SAFE_STARTS = (
    ("GRANT",),
    ("REVOKE",),
    ("ALTER", "DEFAULT"),
    ("ALTER", "DATABASE"),
    ("ALTER", "ROLE"),
    ("COMMENT", "ON", "DATABASE"),
    ("SECURITY", "LABEL"),
)
_SETUP = (("SET",), ("SELECT",))  # the SET and set_config lines pg_restore writes before the statements
_PREAMBLE = (*_SETUP, ("CREATE", "DATABASE"))


def _starts(statement: list[Token], words: tuple[str, ...]) -> bool:
    return len(statement) >= len(words) and all(
        t.is_word(w) for t, w in zip(statement[: len(words)], words, strict=True)
    )


def _starts_any(statement: list[Token], starts: tuple[tuple[str, ...], ...]) -> bool:
    return any(_starts(statement, words) for words in starts)


def _enables_row_security(statement: list[Token]) -> bool:
    """Whether ``statement`` is ``ALTER TABLE [ONLY] [schema.]table ENABLE ROW LEVEL SECURITY`` and nothing more."""
    tail = ("ENABLE", "ROW", "LEVEL", "SECURITY")
    if not _starts(statement, ("ALTER", "TABLE")) or len(statement) < 7:
        return False
    if not all(t.is_word(w) for t, w in zip(statement[-4:], tail, strict=True)):
        return False
    name = statement[2:-4]
    name = name[1:] if name and name[0].is_word("ONLY") else name
    named = [t.kind in ("ident", "word") for t in name[::2]] + [t.kind == "punct" and t.text == "." for t in name[1::2]]
    return len(name) in (1, 3) and all(named)


def _database_statement(statement: list[Token], source: str, target: str) -> list[Token]:
    """Point a database-level statement at ``target``: every ``DATABASE <source name>`` names ``target`` instead."""
    from psycopg import sql

    out = list(statement)
    for k in range(len(out) - 1):
        if out[k].is_word("DATABASE") and out[k + 1].kind in ("ident", "word") and out[k + 1].value == source:
            out[k + 1] = Token("ident", sql.Identifier(target).as_string(None))
    return out


BATCH = 500  # statements per round trip


def _execute_all(admin: PgEndpoint, work: list[str]) -> None:
    """Run every statement in one transaction, ``BATCH`` per round trip; name the one that fails."""
    import psycopg

    with connect(admin, autocommit=False, application_name="pgdr-privileges") as conn:
        conn.execute("SET search_path = ''")
        try:
            for start in range(0, len(work), BATCH):
                conn.execute("\n".join(work[start : start + BATCH]))  # each checked to be one statement above
        except psycopg.Error:
            conn.rollback()  # find the statement, one at a time, then roll back again
            conn.execute("SET search_path = ''")
            for text in work:
                try:
                    conn.execute(text)
                except psycopg.Error as err:
                    raise PrivilegesFailed(
                        f"Applying the backup's owners and grants to {printable(admin.dbname)!r} failed at "
                        f"{printable(text)[:300]!r}: {str(err).splitlines()[0]}. Nothing of this phase was applied "
                        "(one transaction); the restored copy is intact and still owned by the restore role."
                    ) from None
            raise
        conn.commit()


def apply_privileges(
    admin: PgEndpoint, toc: DumpToc, workdir: Path, database_comment: bool = True, skip: tuple[str, ...] = ()
) -> PrivilegesReport:
    """Give the restored copy ``admin.dbname`` its owners, grants, default privileges and database properties.

    Runs as ``admin`` (the server's own connection), after every check passed and before the copy
    is put in place. Owners, grants and properties are applied in one transaction (all or none);
    the superuser-only objects (event triggers, publications) are created after it, event triggers last.

    :param skip: kinds of :data:`SKIPPABLE` objects not to create (the plan's ``skip_objects``); reported.
    :param database_comment: give the database its comment back; ``False`` for a scratch database,
        whose comment is pgdr's marker (a killed run's leftover is found by it).
    :raises PrivilegesFailed: naming the statement that failed; the copy keeps the owners it had.
    """
    import time

    started = time.monotonic()
    report = PrivilegesReport(skipped_objects=toc.described(*NEVER_RESTORED))
    from concurrent.futures import ThreadPoolExecutor

    grant_lines, database_lines = toc.entries(*PRIVILEGE_ENTRIES), list(toc.database_lines)
    secured_lines = toc.entries(*AFTER_CHECKS)
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="pgdr-toc") as pool:  # four pg_restore runs at once
        owners_f = pool.submit(owner_statements, toc, workdir)
        granted_f = pool.submit(_script, toc, grant_lines, workdir, "grants") if grant_lines else None
        database_f = (
            pool.submit(_script, toc, database_lines, workdir, "database", "--create") if database_lines else None
        )
        secured_f = pool.submit(_script, toc, secured_lines, workdir, "row-security") if secured_lines else None
        owners = owners_f.result()
        granted = statements(granted_f.result()) if granted_f else []
        database = statements(database_f.result()) if database_f else []
        secured = statements(secured_f.result()) if secured_f else []
    work: list[tuple[str, str]] = []  # (kind, SQL)
    for statement in secured:  # first: the tables are still the restore role's, which the connection may alter
        if _starts_any(statement, _SETUP):
            continue
        if not _enables_row_security(statement):
            raise PrivilegesFailed(
                f"A row-security entry of the backup holds another statement: {printable(render(statement))[:200]!r}."
            )
        work.append(("row_security", render(statement)))
    for text in owners:
        parsed = statements(text)
        if len(parsed) != 1 or not (_starts(parsed[0], ("ALTER",)) and parsed[0][-3].is_word("OWNER")):
            raise PrivilegesFailed(f"An owner statement of the backup is not one: {printable(text)[:200]!r}.")
        work.append(("owner", text))
    for statement in granted:
        if _starts_any(statement, _SETUP):
            continue
        if not _starts_any(statement, _SAFE_STARTS[:3]):
            raise PrivilegesFailed(
                f"A privilege entry of the backup holds another statement: {printable(render(statement))[:200]!r}."
            )
        work.append(("default" if _starts(statement, ("ALTER", "DEFAULT")) else "grant", render(statement)))
    # The source's name, exactly as CREATE DATABASE gives it (the listing's header prints it with line breaks replaced).
    source = next(
        (st[2].value for st in database if _starts(st, ("CREATE", "DATABASE")) and len(st) > 2), toc.source_dbname
    )
    for statement in database:
        if _starts_any(statement, _PREAMBLE):
            continue
        if not _starts_any(statement, _SAFE_STARTS):
            raise PrivilegesFailed(
                f"A database entry of the backup holds another statement: {printable(render(statement))[:200]!r}."
            )
        if not database_comment and _starts(statement, ("COMMENT", "ON", "DATABASE")):
            continue
        pointed = _database_statement(statement, source, admin.dbname)
        named = {
            pointed[k + 1].value
            for k in range(len(pointed) - 1)
            if pointed[k].is_word("DATABASE") and pointed[k + 1].kind in ("ident", "word")
        }
        if named != {admin.dbname}:  # never a statement about another database (the live one above all)
            raise PrivilegesFailed(
                "A database entry of the backup is about another database than its own "
                f"({printable(render(statement))[:200]!r}); nothing of this phase was applied."
            )
        work.append(("database", render(pointed)))

    _execute_all(admin, [text for _, text in work])
    for kind, _ in work:
        report.owners += kind == "owner"
        report.row_security += kind == "row_security"
        report.grants += kind == "grant"
        report.default_privileges += kind == "default"
        report.database_properties += kind == "database"

    skipped = [d for kind in skip for d in SKIPPABLE[kind]]
    report.skipped_objects += toc.described(*skipped)
    superuser = toc.entries(*(d for d in SUPERUSER_ONLY if d not in skipped))
    if superuser:
        # Event triggers last: none exists while the owners and grants above are applied, so none fired for them.
        ordered = [line for line in superuser if " EVENT TRIGGER " not in line] + [
            line for line in superuser if " EVENT TRIGGER " in line
        ]
        listing = workdir / "superuser.list"
        listing.write_text("\n".join(ordered) + "\n")
        run_tool(
            admin,
            workdir,
            [
                pg_tool("pg_restore"),
                *connection_args(admin),
                "--exit-on-error",
                "--no-password",
                "--single-transaction",
                f"--use-list={listing}",
                str(toc.dump_dir),
            ],
            f"pg_restore of the superuser-only objects into {printable(admin.dbname)!r}",
            PrivilegesFailed,
        )
        report.superuser_objects = toc.described(*(d for d in SUPERUSER_ONLY if d not in skipped))
    report.seconds = time.monotonic() - started
    log.info(
        "Privileges applied to %s: row-level security on %d tables, %d owners, %d grants, %d default privileges, %d "
        "database properties, %d superuser-only objects%s (%.2fs).",
        printable(admin.dbname),
        report.row_security,
        report.owners,
        report.grants,
        report.default_privileges,
        report.database_properties,
        len(report.superuser_objects),
        f"; NOT restored: {', '.join(report.skipped_objects)}" if report.skipped_objects else "",
        report.seconds,
    )
    return report


# -- the application's view ----------------------------------------------------------------------------

# What a role may do on every object of the connected database. With %(check)s false it lists every
# (object, privilege) pair there is, so objects that exist in only one of two databases are told apart.
_APP_VIEW = """
SELECT 'table', format('%%I.%%I', n.nspname, c.relname), p.priv
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) AS p(priv)
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%%'
  AND (NOT %(check)s OR has_table_privilege(%(role)s::name, c.oid, p.priv))
UNION ALL
SELECT 'column', format('%%I.%%I.%%I', n.nspname, c.relname, a.attname), p.priv
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) AS p(priv)
WHERE a.attacl IS NOT NULL AND NOT a.attisdropped
  AND (NOT %(check)s OR has_column_privilege(%(role)s::name, c.oid, a.attnum, p.priv))
UNION ALL
SELECT 'sequence', format('%%I.%%I', n.nspname, c.relname), p.priv
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN unnest(ARRAY['USAGE', 'SELECT', 'UPDATE']) AS p(priv)
WHERE c.relkind = 'S' AND (NOT %(check)s OR has_sequence_privilege(%(role)s::name, c.oid, p.priv))
UNION ALL
SELECT 'schema', format('%%I', n.nspname), p.priv
FROM pg_namespace n CROSS JOIN unnest(ARRAY['USAGE', 'CREATE']) AS p(priv)
WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%%'
  AND (NOT %(check)s OR has_schema_privilege(%(role)s::name, n.oid, p.priv))
UNION ALL
SELECT 'function', f.oid::regprocedure::text, 'EXECUTE'
FROM pg_proc f JOIN pg_namespace n ON n.oid = f.pronamespace
WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%%'
  AND (NOT %(check)s OR has_function_privilege(%(role)s::name, f.oid, 'EXECUTE'))
UNION ALL
SELECT 'database', '', p.priv FROM unnest(ARRAY['CONNECT', 'TEMPORARY', 'CREATE']) AS p(priv)
WHERE NOT %(check)s OR has_database_privilege(%(role)s::name, current_database(), p.priv)
"""


def _app_view(endpoint: PgEndpoint, role: str | None) -> set[tuple[str, str, str]]:
    with connect(endpoint, application_name="pgdr-app-roles") as conn:
        conn.execute("SET search_path = ''")  # function signatures schema-qualified alike in both databases
        return {
            tuple(row) for row in conn.execute(_APP_VIEW, {"role": role or "", "check": role is not None}).fetchall()
        }


def compare_app_roles(live: PgEndpoint, restored: PgEndpoint, roles: tuple[str, ...]) -> dict[str, dict]:
    """For each of the application's logins, what it may do on the restored copy against the live database.

    Only objects present in both are compared (tables created since the backup are not a difference).

    :return: per role ``{"checked": n, "lost": [...], "gained": [...]}``, each entry ``"SELECT on table s.t"``.
    """
    both = {(k, o) for k, o, _ in _app_view(live, None)} & {(k, o) for k, o, _ in _app_view(restored, None)}
    missing_on = [
        where for where, endpoint in (("live", live), ("restored", restored)) if set(roles) - server_roles(endpoint)
    ]
    if missing_on:
        raise PrivilegesFailed(
            f"The plan's app_roles {', '.join(roles)} must exist on the {' and '.join(missing_on)} server to be "
            "checked; create the application's logins there (or remove them from app_roles)."
        )
    result = {}
    for role in roles:
        before = {p for p in _app_view(live, role) if p[:2] in both}
        after = {p for p in _app_view(restored, role) if p[:2] in both}

        def said(items):  # whole objects before their columns, which follow from them
            order = ("database", "schema", "table", "sequence", "function", "column")
            return [
                f"{priv} on {kind} {name}".rstrip()
                for kind, name, priv in sorted(items, key=lambda i: (order.index(i[0]), i[1], i[2]))
            ]

        result[role] = {"checked": len(before | after), "lost": said(before - after), "gained": said(after - before)}
    return result


def app_roles_problem(compared: dict[str, dict]) -> str | None:
    """Return the message for the differences :func:`compare_app_roles` found, or ``None`` when there are none."""
    parts = []
    for role, found in compared.items():
        if found["lost"]:
            parts.append(f"{role} could and now cannot: {'; '.join(found['lost'][:10])}")
        if found["gained"]:
            parts.append(f"{role} now can and could not: {'; '.join(found['gained'][:10])}")
    if not parts:
        return None
    return (
        "The application's logins would not see the restored copy as they see the live database: "
        + " | ".join(parts)
        + ". Grants changed since the backup are the usual cause: re-apply them to the restored copy (it is kept), "
        "or restore a newer backup. The live database was not changed."
    )


def globals_of(dump_dir: Path) -> str | None:
    """Return the source server's ``pg_dumpall --globals-only`` stored with the backup in ``dump_dir`` (``None``:
    older backups)."""
    from pgdr.logical.backup import GLOBALS_FILE

    path = dump_dir / GLOBALS_FILE
    return path.read_text(errors="replace") if path.is_file() else None
