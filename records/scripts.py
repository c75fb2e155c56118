"""Reading a submitted script without running it: unpack self-extracting wrappers and derive the
default configuration from its environment reads.

Recent records ship `train_gpt.py` as `exec(lzma.decompress(base64.b85decode("...")))` (with raw
LZMA filters in some; `python train_gpt.py --pack` may write brotli in place of lzma), so a plain
diff shows one line. `unpack` evaluates only a whitelist of pure decoding calls on string constants
found by parsing; nothing in the script is ever executed.
"""

from __future__ import annotations

import ast
import base64
import bz2
import gzip
import lzma
import re
import zlib
from pathlib import Path

try:
    import brotli
except ImportError:  # optional (requirements.txt): brotli wrappers are then reported, not unpacked
    brotli = None

MAX_UNPACKED = 64 * 1024 * 1024  # a script larger than this is not a script
MAX_LAYERS = 4
_MODULES = {"lzma": lzma, "zlib": zlib, "base64": base64, "gzip": gzip, "bz2": bz2}
if brotli is not None:
    _MODULES["brotli"] = brotli
_DECODERS = {
    ("base64", "b85decode"),
    ("base64", "b64decode"),
    ("base64", "a85decode"),
    ("base64", "b32decode"),
    ("base64", "b16decode"),
    ("base64", "urlsafe_b64decode"),
}
_DECOMPRESSORS = {
    ("lzma", "decompress"),
    ("zlib", "decompress"),
    ("gzip", "decompress"),
    ("bz2", "decompress"),
    ("brotli", "decompress"),
}


class Unsupported(Exception):
    """The expression is not a pure decoding of constants."""


_DECODE_ERRORS = (Unsupported, ValueError, TypeError, lzma.LZMAError, zlib.error, OSError, EOFError)
if brotli is not None:
    _DECODE_ERRORS += (brotli.error,)


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> module for `import lzma as L`, `import base64`, ..."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in _MODULES:
                    names[alias.asname or alias.name] = alias.name
    return names


def _function(node: ast.expr, aliases: dict[str, str]) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
        return aliases[node.value.id], node.attr
    return None


def _const(node: ast.expr, aliases: dict[str, str]):
    """Constants, lists/dicts of them and module constants such as lzma.FORMAT_RAW."""
    fn = _function(node, aliases)
    if fn is not None:
        value = getattr(_MODULES[fn[0]], fn[1], None)
        if isinstance(value, int):
            return value
        raise Unsupported(f"{fn[0]}.{fn[1]}")
    if isinstance(node, ast.List):
        return [_const(e, aliases) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_const(k, aliases): _const(v, aliases) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.Constant):
        return node.value
    raise Unsupported(ast.dump(node)[:60])


def _decompress(module: str, data: bytes, kwargs: dict) -> bytes:
    if module == "lzma":
        out = lzma.LZMADecompressor(kwargs.get("format", lzma.FORMAT_AUTO), None, kwargs.get("filters"))
        result = out.decompress(data, max_length=MAX_UNPACKED)
    elif module == "zlib":
        result = zlib.decompressobj().decompress(data, MAX_UNPACKED)
    elif module == "brotli":
        result = brotli.Decompressor().process(data, output_buffer_limit=MAX_UNPACKED)
    else:
        result = _MODULES[module].decompress(data)
    if len(result) >= MAX_UNPACKED:
        raise Unsupported("unpacked text over 64 MiB")
    return result


def evaluate(node: ast.expr, aliases: dict[str, str]):
    """Value of a pure decoding expression; Unsupported for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        return node.value
    if not isinstance(node, ast.Call):
        raise Unsupported(type(node).__name__)
    if isinstance(node.func, ast.Attribute) and node.func.attr in ("decode", "encode") and not node.keywords:
        inner = evaluate(node.func.value, aliases)
        if node.func.attr == "decode" and isinstance(inner, bytes):
            return inner.decode(*[_const(a, aliases) for a in node.args])
        if node.func.attr == "encode" and isinstance(inner, str):
            return inner.encode(*[_const(a, aliases) for a in node.args])
        raise Unsupported(node.func.attr)
    fn = _function(node.func, aliases)
    if fn is None or len(node.args) != 1:
        raise Unsupported("call")
    arg = evaluate(node.args[0], aliases)
    kwargs = {kw.arg: _const(kw.value, aliases) for kw in node.keywords}
    if fn in _DECODERS and not kwargs:
        return getattr(base64, fn[1])(arg)
    if fn in _DECOMPRESSORS and isinstance(arg, bytes):
        return _decompress(fn[0], arg, kwargs)
    raise Unsupported(".".join(fn))


def _exec_payload(tree: ast.Module) -> ast.expr | None:
    """The argument of a top-level exec(...) call, if the module is a wrapper around one."""
    for node in tree.body:
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "exec"
            and node.value.args
        ):
            return node.value.args[0]
    return None


def _sibling(payload: ast.expr, script: Path) -> Path | None:
    """`exec(open(__file__.replace("train_gpt.py", "other.py")).read())`: the .py file it names."""
    for node in ast.walk(payload):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            candidate = script.parent / node.value
            if candidate.name != script.name and candidate.is_file():
                return candidate
    return None


def unpack(text: str, script: Path) -> tuple[str, list[str]]:
    """(readable source, notes on what was unpacked). Text that is not a wrapper is returned as is."""
    notes = []
    for _ in range(MAX_LAYERS):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            return text, notes
        payload = _exec_payload(tree)
        if payload is None or len(tree.body) > 3:
            return text, notes
        try:
            value = evaluate(payload, _aliases(tree))
        except _DECODE_ERRORS as exc:
            other = _sibling(payload, script)
            if other is None:
                notes.append(f"{script.name}: exec wrapper not unpacked ({exc})")
                return text, notes
            notes.append(f"{script.name}: runs {other.name}; diffing that file")
            script, text = other, other.read_text(encoding="utf-8", errors="replace")
            continue
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        notes.append(f"{script.name}: unpacked a self-extracting wrapper ({len(text):,} characters)")
    return text, notes


# ---- default configuration -------------------------------------------------------------------------


def _env_name_default(call: ast.Call, wrappers: set[str]) -> tuple[str, ast.expr | None] | None:
    """(NAME, default node) for os.environ.get / os.getenv / environ.get / a wrapper of them."""
    func = call.func
    direct = (isinstance(func, ast.Attribute) and func.attr in ("get", "getenv")) and (
        (isinstance(func.value, ast.Attribute) and func.value.attr == "environ")
        or (isinstance(func.value, ast.Name) and func.value.id in ("environ", "os"))
    )
    wrapped = isinstance(func, ast.Name) and func.id in wrappers
    if not (direct or wrapped) or not call.args:
        return None
    name = call.args[0]
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
        return None
    return name.value, call.args[1] if len(call.args) > 1 else None


def _wrappers(tree: ast.Module) -> set[str]:
    """Functions whose first parameter is passed as the name to an environment read, e.g.
    `def _e(name, default, cast): return cast(os.environ.get(name, default))`."""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or not node.args.args:
            continue
        first = node.args.args[0].arg
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Name):
                if call.args[0].id == first and isinstance(call.func, ast.Attribute):
                    if call.func.attr in ("get", "getenv"):
                        found.add(node.name)
    return found


def default_config(text: str) -> dict[str, str]:
    """NAME -> default, as written in the source, for every environment read with a constant name
    (the first read of a name wins). Parsed, never executed."""
    tree = ast.parse(text)
    wrappers = _wrappers(tree)
    config: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found = _env_name_default(node, wrappers)
            if found is None:
                continue
            name, default = found
            if default is None:
                value = "<unset>"
            elif isinstance(default, ast.Constant):
                value = str(default.value)
            else:
                value = ast.unparse(default)
            config.setdefault(name, value)
    return config


# Scripts written for a newer Python (e.g. 3.12 nested f-strings) do not parse here; their reads
# are then found by this pattern over the text, for constant defaults only.
_ENV_RE = re.compile(
    r"""(?:environ\.get|getenv)\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']\s*(?:,\s*("[^"]*"|'[^']*'|[-+\w.]+))?\s*\)"""
)


def default_config_by_pattern(text: str) -> dict[str, str]:
    config: dict[str, str] = {}
    for name, default in _ENV_RE.findall(text):
        config.setdefault(name, default.strip("\"'") if default else "<unset>")
    return config
