"""Identifiers: the one rule for turning PostgreSQL names into SQL, tool arguments and text.

A PostgreSQL name may hold any character but NUL: upper case, spaces, dots, double quotes,
``%``, unicode and emoji; it may be a reserved word or start with ``-``. pgdr therefore never
pastes a name into SQL, a client tool's command line or a Great Expectations asset as it is:

* **In SQL**, a name is a :class:`psycopg.sql.Identifier` (see :meth:`QualifiedName.sql`).
* **In text** (manifests, suite files, the ``tables`` param, reports, alerts and logs) a table
  is written as SQL writes it: ``schema.table``, each part double-quoted when SQL needs quotes,
  with ``"`` doubled inside. ``public.customers``, ``public."order"``, ``"Sales Dept"."Customer
  Accounts"``. The text is unambiguous: ``a."b.c"`` and ``"a.b".c`` are different tables. It is
  the key of the manifest's row counts, so a key is written exactly one way (quoted only where
  PostgreSQL's own ``quote_ident`` would quote), and :func:`parse_qualified_name` reads what a
  person types (unquoted parts are folded to lower case, as SQL folds them).
* **For the client tools** a database is named in a libpq connection string built by
  :func:`conninfo`, never as a bare argument that could be read as an option or a pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgdr.errors import PermanentFailure

MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names

# pg_get_keywords() of PostgreSQL 18 with catcode <> 'U': the words quote_ident() quotes.
_KEYWORDS = frozenset(
    """
all analyse analyze and any array as asc asymmetric authorization between bigint binary bit boolean
both case cast char character check coalesce collate collation column concurrently constraint create
cross current_catalog current_date current_role current_schema current_time current_timestamp
current_user dec decimal default deferrable desc distinct do else end except exists extract false
fetch float for foreign freeze from full grant greatest group grouping having ilike in initially
inner inout int integer intersect interval into is isnull join json json_array json_arrayagg
json_exists json_object json_objectagg json_query json_scalar json_serialize json_table json_value
lateral leading least left like limit localtime localtimestamp merge_action national natural nchar
none normalize not notnull null nullif numeric offset on only or order out outer overlaps overlay
placing position precision primary real references returning right row select session_user setof
similar smallint some substring symmetric system_user table tablesample then time timestamp to
trailing treat trim true union unique user using values varchar variadic verbose when where window
with xmlattributes xmlconcat xmlelement xmlexists xmlforest xmlnamespaces xmlparse xmlpi xmlroot
xmlserialize xmltable
""".split()
)
_PLAIN = re.compile(r"^[a-z_][a-z0-9_]*$")
# PostgreSQL's scanner: an unquoted identifier starts with a letter, _ or any non-ASCII character.
_UNQUOTED = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

EXAMPLE = 'sales.orders, public."order" or "Sales Dept"."Customer Accounts"'


class InvalidIdentifier(PermanentFailure):
    """A name written by a person (a ``tables`` entry, a suite's ``table``) cannot be read."""


def quote_ident(name: str) -> str:
    """Return ``name`` as SQL writes it: bare when it is a plain lower-case non-keyword, else quoted.

    This is PostgreSQL's ``quote_ident()``, so ``public.customers`` stays as it always was.
    """
    if _PLAIN.match(name) and name not in _KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def sql_identifier(name: str) -> str:
    """Return ``name`` always double-quoted, for SQL text built without a psycopg connection."""
    return '"' + name.replace('"', '""') + '"'


def unicode_identifier(name: str) -> str:
    """Return ``name`` as a ``U&"..."`` identifier whose text is only ASCII letters, digits and escapes.

    For SQL that passes through other tools' text processing (Great Expectations and SQLAlchemy
    read ``%``, ``:`` and braces in query text as placeholders, even inside quotes): PostgreSQL
    reads ``U&"a\\0025b"`` as the name ``a%b``.
    """

    def escape(char: str) -> str:
        if char.isascii() and (char.isalnum() or char == "_"):
            return char
        code = ord(char)
        return f"\\{code:04x}" if code <= 0xFFFF else f"\\+{code:06x}"

    return 'U&"' + "".join(escape(c) for c in name) + '"'


def printable(text: str) -> str:
    """Return ``text`` with control characters (a newline in a table name) shown as escapes.

    For log lines and messages only: a hostile name must not be able to forge a line of its own.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


@dataclass(frozen=True, order=True)
class QualifiedName:
    """A schema-qualified name (a table, a sequence), exactly as stored in the catalog."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def sql(self):
        """Return the name as a psycopg SQL identifier (``"schema"."name"``)."""
        from psycopg import sql

        return sql.Identifier(self.schema, self.name)

    def unicode_quoted(self) -> str:
        """Return both parts as :func:`unicode_identifier` (plain ASCII SQL text; see there)."""
        return f"{unicode_identifier(self.schema)}.{unicode_identifier(self.name)}"

    def quoted(self) -> str:
        """Return ``"schema"."name"``, both parts quoted: SQL text (or ``::regclass`` input) for this relation."""
        return f"{sql_identifier(self.schema)}.{sql_identifier(self.name)}"


def table_key(schema: str, name: str) -> str:
    """Return the key of a table or sequence in row-count and sequence maps (see the module doc)."""
    return str(QualifiedName(schema, name))


def _fail(text: str, problem: str, what: str) -> InvalidIdentifier:
    return InvalidIdentifier(
        f"{what} {printable(text)!r} {problem}. Write schema.table as SQL does, double-quoting a part that has "
        f"upper case, spaces, dots or other special characters: {EXAMPLE}."
    )


def parse_qualified_name(text: str, what: str = "table name") -> QualifiedName:
    """Read ``schema.table`` written as SQL writes it; unquoted parts fold to lower case.

    :param what: how the caller names the value in an error (``tables entry``, ``suite table``).
    :raises InvalidIdentifier: saying what is wrong and how to write it.
    """
    if not isinstance(text, str):
        raise InvalidIdentifier(f"{what} must be text such as {EXAMPLE}; got {text!r}.")
    if "\x00" in text:
        raise _fail(text, "contains a NUL character, which no PostgreSQL name can hold", what)
    parts: list[str] = []
    pos, end = 0, len(text)

    def skip_space(at: int) -> int:
        while at < end and text[at].isspace():
            at += 1
        return at

    pos = skip_space(pos)
    while True:
        if pos >= end:
            raise _fail(text, "is empty or ends with a dot" if parts or not text.strip() else "is incomplete", what)
        if text[pos] == '"':
            chunk, pos = [], pos + 1
            while True:
                close = text.find('"', pos)
                if close < 0:
                    raise _fail(text, "has a double quote that is never closed", what)
                chunk.append(text[pos:close])
                if close + 1 < end and text[close + 1] == '"':  # "" inside quotes is one "
                    chunk.append('"')
                    pos = close + 2
                    continue
                pos = close + 1
                break
            part = "".join(chunk)
            if not part:
                raise _fail(text, 'has an empty quoted name ""', what)
        else:
            match = _UNQUOTED.match(text, pos)
            if not match:
                raise _fail(text, f"has {text[pos]!r} where a name should start", what)
            part = match.group().translate(_ASCII_LOWER)  # SQL folds ASCII letters only
            pos = match.end()
        if len(part.encode()) > MAX_IDENTIFIER_BYTES:
            raise _fail(text, f"has a part longer than PostgreSQL's {MAX_IDENTIFIER_BYTES} bytes", what)
        parts.append(part)
        after = skip_space(pos)
        if after >= end:
            break
        if text[after] != ".":
            odd = "' '" if after > pos else repr(text[after])
            raise _fail(text, f"has {odd} after {quote_ident(part)} (an unquoted name cannot hold it)", what)
        pos = after
        pos = skip_space(pos + 1)
    if len(parts) != 2:
        problem = "names no schema" if len(parts) == 1 else f"has {len(parts)} parts, not two"
        raise _fail(text, problem, what)
    return QualifiedName(parts[0], parts[1])


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def legacy_table_key(key: str) -> str:
    """Return the key of a pgdr 0.1/0.2 manifest (``schema.table``, unquoted) in today's syntax.

    Those manifests joined the two names with a dot and no quoting; the schema is read up to the
    first dot, which is right for every schema whose own name has no dot.
    """
    schema, _, name = key.partition(".")
    return table_key(schema, name)


def conninfo(host: str, port: int, user: str, dbname: str, **extra: str) -> str:
    """Return a libpq connection string; every value quoted, so no name is read as an option.

    Client tools get the database through it (``--dbname=<conninfo>``): a bare database name
    that contains ``=`` would be read as a connection string, and ``pg_amcheck -d`` reads a
    pattern, where ``*`` and ``.`` mean something.
    """

    def value(text) -> str:
        return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"

    pairs = {"host": host, "port": port, "user": user, "dbname": dbname, **extra}
    return " ".join(f"{key}={value(val)}" for key, val in pairs.items() if val is not None)
