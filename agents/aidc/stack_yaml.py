"""The YAML reader for stack files: YAML 1.2 core scalars, a few tags, and limits.

PyYAML's SafeLoader reads YAML 1.1: `1:30` is the integer 90, `yes`/`on` are booleans, `2026-01-31`
is a date, and `0123` is octal. Pulumi itself reads stack files as YAML 1.2, where all of those
are strings, so the cluster spec must read them the same way. This reader also bounds what a small
file can cost: aliases may not expand past a fixed number of values (a 1 KB "billion laughs"
file would otherwise make millions), nesting is limited (instead of a RecursionError), only the
core tags are accepted (`!!timestamp`, `!!binary`, `!!set`, `!custom` and friends are refused),
merge keys (`<<: *base`) work, and a key written twice in one mapping is refused.

Every failure is a `StackYamlError` carrying the 1-based line and what was expected there.
"""

from __future__ import annotations

import re

from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.error import MarkedYAMLError, YAMLError
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader, ReaderError
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

# Real stack files have a few dozen values, nest 5 levels deep and use a handful of anchors.
MAX_DEPTH = 32
MAX_ALIASES = 128
MAX_VALUES = 20_000  # scalars, sequences and mappings, counting each alias as what it expands to

TAG = "tag:yaml.org,2002:"
INT_TAG, FLOAT_TAG, BOOL_TAG, NULL_TAG = (TAG + kind for kind in ("int", "float", "bool", "null"))
STR_TAG, SEQ_TAG, MAP_TAG, MERGE_TAG = (TAG + kind for kind in ("str", "seq", "map", "merge"))

# YAML 1.2 core schema. Decimal integers are bounded in length (Python refuses to parse very long
# ones), and no number may have a leading zero, so `0570` stays a string rather than becoming
# 570 (YAML 1.2) or 376 (YAML 1.1 octal).
_INT = re.compile(r"[-+]?(0|[1-9][0-9]{0,99})|0o[0-7]{1,21}|0x[0-9a-fA-F]{1,16}")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|(0|[1-9][0-9]*)(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(inf|Inf|INF)")
_NAN = re.compile(r"\.(nan|NaN|NAN)")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_NULL = ("", "~", "null", "Null", "NULL")
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what PyYAML counts as a new line


class StackYamlError(Exception):
    """The text is not a stack file aidc accepts; `line` is 1-based (None: the whole file)."""

    def __init__(self, line: int | None, expected: str):
        self.line, self.expected = line, expected
        super().__init__(f"line {line}: {expected}" if line else expected)


def quote(value: object, limit: int = 40) -> str:
    """A short one-line repr of a value from the file, however large it is."""
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'} of {len(value)} item(s)"
    return _cut(repr(value), limit)


def one_line(text: str, limit: int = 200) -> str:
    """Text from the file or from PyYAML made fit for a one-line error message."""
    return _cut(" ".join(text.split()), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _tag_name(tag: str) -> str:
    return _cut("!!" + tag[len(TAG):] if tag.startswith(TAG) else tag, 40)


class _Refusal(MarkedYAMLError):
    """A limit or rule of this reader, raised at a mark; converted to StackYamlError."""

    def __init__(self, expected: str, mark):
        super().__init__(problem=expected, problem_mark=mark)


class _Resolver(BaseResolver):
    yaml_implicit_resolvers: dict = {}


for _tag, _pattern, _first in [
    (BOOL_TAG, "|".join(_BOOL), "tTfF"),
    (INT_TAG, _INT.pattern, "-+0123456789"),
    (FLOAT_TAG, f"{_FLOAT.pattern}|{_INF.pattern}|{_NAN.pattern}", "-+.0123456789"),
    (NULL_TAG, "~|null|Null|NULL|", ["~", "n", "N", ""]),
    (MERGE_TAG, "<<", "<"),
]:
    _Resolver.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), list(_first))


class _LimitedComposer(Composer):
    """Composes the node graph with bounded depth and alias count, and no recursive aliases."""

    def compose_document(self):
        self._depth, self._aliases, self._values, self._open_anchors = 0, 0, 0, set()
        node = super().compose_document()
        _expanded(node, {})
        return node

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refusal(f"at most {MAX_ALIASES} aliases in a stack file", event.start_mark)
            if event.anchor in self._open_anchors:
                raise _Refusal(f"no alias inside the node it names (*{event.anchor[:40]} is recursive)",
                               event.start_mark)
            return super().compose_node(parent, index)
        self._values += 1  # written values; what aliases add is measured once the graph is whole
        if self._values > MAX_VALUES:
            raise _Refusal(f"at most {MAX_VALUES} values in a stack file", event.start_mark)
        if isinstance(event, CollectionStartEvent):
            if self._depth >= MAX_DEPTH:
                raise _Refusal(f"at most {MAX_DEPTH} levels of nesting", event.start_mark)
            self._depth += 1
        anchor = event.anchor if isinstance(event, (ScalarEvent, CollectionStartEvent)) else None
        if anchor is not None:
            # YAML 1.2 (and Pulumi's reader) let an anchor be redefined: later aliases name the new node.
            self.anchors.pop(anchor, None)
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.discard(anchor)
            if isinstance(event, CollectionStartEvent):
                self._depth -= 1


def _expanded(node: Node, seen: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(values, levels of nesting) the node stands for once every alias is expanded.

    Each node is measured once (aliases share nodes), so this is linear in the file, while
    what it measures can be exponential: that is what it refuses."""
    if id(node) in seen:
        return seen[id(node)]
    if isinstance(node, ScalarNode):
        return 1, 0
    children = node.value if isinstance(node, SequenceNode) else [n for pair in node.value for n in pair]
    measured = [_expanded(child, seen) for child in children]
    size = 1 + sum(values for values, _ in measured)
    depth = 1 + max((levels for _, levels in measured), default=0)
    if size > MAX_VALUES:
        raise _Refusal(f"aliases that expand to at most {MAX_VALUES} values in all (this node expands to "
                       f"more: an alias bomb?)", node.start_mark)
    if depth > MAX_DEPTH:
        raise _Refusal(f"at most {MAX_DEPTH} levels of nesting (aliases expanded)", node.start_mark)
    seen[id(node)] = size, depth
    return size, depth


class _StrictConstructor(SafeConstructor):
    """Builds plain dicts, lists and scalars from the core tags only; every other tag is refused."""

    yaml_constructors: dict = {}

    def _scalar(self, node, kind: str) -> str:
        if not isinstance(node, ScalarNode):
            raise _Refusal(f"a scalar for {kind}, not a {node.id}", node.start_mark)
        return node.value

    def construct_core_str(self, node):
        return self._scalar(node, "!!str")

    def construct_core_int(self, node):
        value = self._scalar(node, "!!int")
        if not _INT.fullmatch(value):
            raise _Refusal(f"an integer for !!int, not {quote(value)}", node.start_mark)
        if value.startswith(("0o", "0x")):
            return int(value[2:], 8 if value[1] == "o" else 16)
        return int(value)

    def construct_core_float(self, node):
        value = self._scalar(node, "!!float")
        if _INF.fullmatch(value):
            return float("-inf") if value.startswith("-") else float("inf")
        if _NAN.fullmatch(value):
            return float("nan")
        if not (_FLOAT.fullmatch(value) or _INT.fullmatch(value)):
            raise _Refusal(f"a number for !!float, not {quote(value)}", node.start_mark)
        return float(int(value[2:], 8 if value[1] == "o" else 16)) if value.startswith(("0o", "0x")) \
            else float(value)

    def construct_core_bool(self, node):
        value = self._scalar(node, "!!bool")
        if value not in _BOOL:
            raise _Refusal(f"true or false for !!bool, not {quote(value)}", node.start_mark)
        return _BOOL[value]

    def construct_core_null(self, node):
        value = self._scalar(node, "!!null")
        if value not in _NULL:
            raise _Refusal(f"null or ~ for !!null, not {quote(value)}", node.start_mark)
        return None

    def construct_core_merge(self, node):
        # `<<` outside a mapping key is plain text, as in YAML 1.2.
        return self._scalar(node, "!!str")

    def construct_core_seq(self, node):
        if not isinstance(node, SequenceNode):
            raise _Refusal(f"a sequence for !!seq, not a {node.id}", node.start_mark)
        return [self.construct_object(child, deep=True) for child in node.value]

    def construct_core_map(self, node):
        if not isinstance(node, MappingNode):
            raise _Refusal(f"a mapping for !!map, not a {node.id}", node.start_mark)
        merged: dict = {}
        own: dict = {}
        first_line: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise _Refusal(f"a plain key, not a {key_node.id}", key_node.start_mark)
            if key_node.tag == MERGE_TAG:
                key = "<<"
            else:
                key = self.construct_object(key_node, deep=True)
            if key in first_line:
                raise _Refusal(f"no duplicate key {quote(key)} in one mapping (first on line {first_line[key]})",
                               key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
            if key_node.tag == MERGE_TAG:
                merged = self._merge_sources(value_node)
            else:
                own[key] = self.construct_object(value_node, deep=True)
        return {**merged, **own}

    def _merge_sources(self, value_node) -> dict:
        # `<<: *base` or `<<: [*a, *b]`; keys of earlier mappings win, the mapping's own keys win over all.
        sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
        out: dict = {}
        for source in sources:
            if not isinstance(source, MappingNode):
                raise _Refusal("a mapping or a list of mappings after the merge key <<", source.start_mark)
            for key, value in self.construct_object(source, deep=True).items():
                out.setdefault(key, value)
        return out

    def construct_refused(self, node):
        raise _Refusal(f"only the tags !!str !!int !!float !!bool !!null !!seq !!map in a stack file, "
                       f"not {_tag_name(node.tag)}", node.start_mark)


for _tag, _constructor in [
    (STR_TAG, _StrictConstructor.construct_core_str),
    (INT_TAG, _StrictConstructor.construct_core_int),
    (FLOAT_TAG, _StrictConstructor.construct_core_float),
    (BOOL_TAG, _StrictConstructor.construct_core_bool),
    (NULL_TAG, _StrictConstructor.construct_core_null),
    (MERGE_TAG, _StrictConstructor.construct_core_merge),
    (SEQ_TAG, _StrictConstructor.construct_core_seq),
    (MAP_TAG, _StrictConstructor.construct_core_map),
    (None, _StrictConstructor.construct_refused),
]:
    _StrictConstructor.add_constructor(_tag, _constructor)


class _StackLoader(Reader, Scanner, Parser, _LimitedComposer, _StrictConstructor, _Resolver):
    def __init__(self, text: str):
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        _LimitedComposer.__init__(self)
        _StrictConstructor.__init__(self)
        _Resolver.__init__(self)


def load_stack_yaml(text: str) -> object:
    """Parse one YAML document with the stack-file rules; raises StackYamlError."""
    loader = None
    try:
        loader = _StackLoader(text)  # the reader checks every character here
        return loader.get_single_data()
    except ReaderError as exc:  # a character YAML does not allow; it has a position, not a mark
        line = len(_LINE_BREAK.findall(text, 0, exc.position)) + 1
        raise StackYamlError(line, f"printable text (character U+{exc.character:04X} is not allowed in YAML)") from None
    except _Refusal as exc:
        raise StackYamlError(exc.problem_mark.line + 1, exc.problem) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context
        raise StackYamlError(mark.line + 1 if mark else None, f"valid YAML ({one_line(str(what))})") from None
    except YAMLError as exc:
        raise StackYamlError(None, f"valid YAML ({one_line(str(exc))})") from None
    finally:
        if loader is not None:
            loader.dispose()
