"""Training text for the embedded demo model, built from documentation that ships with CPython.

Sources (all under the PSF License, like CPython itself):
  - pydoc_data.topics.topics: the language reference topics `help("with")` shows;
  - docstrings of the pure-Python standard library, read with `ast` from the .py files (no
    module is imported, so nothing in the stdlib runs: `antigravity` opens no browser);
  - docstrings of builtins and a few C modules, read with `inspect` (importing them is inert).

From those we make two kinds of documents:
  - plain text: a heading (module, class or signature) and the docstring;
  - chats in Kimi K2's format, rendered by KIMI_CHAT_TEMPLATE (the same template the shipped
    tokenizer_config.json carries, so training text and inference prompts agree byte for byte):
    "What does str.split do?" -> the docstring; a share with <think>...</think> reasoning for
    thinking mode, and a share with a tool call and its result.

Everything is deterministic for a given CPython and seed. No network, no downloads.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Kimi K2's special tokens. Ids are assigned in this order from 0 by the tokenizer trainer.
SPECIAL_TOKENS = [
    "[BOS]",
    "[EOS]",
    "[PAD]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<think>",
    "</think>",
]

DEFAULT_SYSTEM = "You are a helpful assistant that answers questions about Python."

# A Kimi K2-style chat template, written for this project.
#   - tools (if any) are declared in a `tool_declare` system message, as JSON;
#   - with no system message first, a default one is inserted;
#   - assistant turns after the last user message show their reasoning as <think>...</think>;
#     earlier assistant turns get an empty <think></think> (their reasoning is dropped, as Kimi does);
#   - tool calls: <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
#     <|tool_call_argument_begin|>{json}<|tool_call_end|>...<|tool_calls_section_end|>;
#   - tool results: a `tool` system turn, "## Return of ID\n" then the content;
#   - the generation prompt opens <think> (thinking mode, the default; also `thinking=None`) or
#     closes it at once (`thinking=False`, instant mode).
KIMI_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is not none -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{ part }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>"
    "{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>" + DEFAULT_SYSTEM + "<|im_end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role == 'system' -%}"
    "<|im_system|>system<|im_middle|>{{ render_content(message['content']) }}<|im_end|>"
    "{%- elif role == 'user' -%}"
    "<|im_user|>user<|im_middle|>{{ render_content(message['content']) }}<|im_end|>"
    "{%- elif role == 'tool' -%}"
    "<|im_system|>tool<|im_middle|>## Return of {{ message['tool_call_id'] }}\n"
    "{{ render_content(message['content']) }}<|im_end|>"
    "{%- elif role == 'assistant' -%}"
    "<|im_assistant|>assistant<|im_middle|>"
    "{%- if loop.index0 > ns.last_user and message.get('reasoning_content') -%}"
    "<think>{{ message['reasoning_content'] }}</think>"
    "{%- else -%}"
    "<think></think>"
    "{%- endif -%}"
    "{{ render_content(message['content']) }}"
    "{%- if message.get('tool_calls') -%}"
    "<|tool_calls_section_begin|>"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "<|tool_call_begin|>"
    "{{ call['id'] if call['id'] is defined and call['id'] else 'functions.' ~ fn['name'] ~ ':' ~ loop.index0 }}"
    "<|tool_call_argument_begin|>"
    "{{ fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson }}"
    "<|tool_call_end|>"
    "{%- endfor -%}"
    "<|tool_calls_section_end|>"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "<|im_assistant|>assistant<|im_middle|>"
    "{%- if thinking is defined and thinking is not none and not thinking -%}"
    "<think></think>"
    "{%- else -%}"
    "<think>"
    "{%- endif -%}"
    "{%- endif -%}"
)

# The one tool the synthetic tool-call chats use.
HELP_TOOL = {
    "type": "function",
    "function": {
        "name": "python_help",
        "description": "Return the documentation of a Python module, class or function.",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "description": "dotted name, e.g. json.dumps"}},
            "required": ["name"],
        },
    },
}

# C modules whose import does nothing but define functions; read with inspect.
_INSPECT_MODULES = ["builtins", "math", "cmath", "itertools", "operator", "time", "sys", "gc",
                    "array", "binascii", "zlib", "marshal", "errno", "_collections_abc"]

# Top-level stdlib folders that are tests, demos or GUI-only; their docstrings teach little.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3",
              "tkinter", "turtledemo", "idlelib", "ensurepip", "__pycache__", "pydoc_data"}

MAX_DOC_CHARS = 1500  # long docstrings are cut at a paragraph boundary below this


@dataclass
class DocEntry:
    """One documented thing: `name` is dotted (json.dumps), `kind` module/class/function/topic."""

    name: str
    kind: str
    heading: str  # signature or title line, e.g. "json.dumps(obj, *, skipkeys=False, ...)"
    doc: str
    full: str = ""  # the untruncated text, when it differs (topics); used for plain documents
    core: bool = False  # builtins, C modules and topics: what people ask about most


def _clean(doc: str | None, limit: int = MAX_DOC_CHARS) -> str:
    if not doc:
        return ""
    doc = inspect.cleandoc(doc).strip()
    if len(doc) > limit:
        cut = doc.rfind("\n\n", 0, limit)
        doc = doc[: cut if cut > 200 else limit].rstrip()
    # Tiny models copy odd whitespace; keep text ASCII-ish and compact.
    return "\n".join(line.rstrip() for line in doc.splitlines())


def _signature_from_ast(qual: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(node.args)
    if args.startswith("self, ") or args == "self":
        args = args[6:] if args != "self" else ""
    elif args.startswith("cls, ") or args == "cls":
        args = args[5:] if args != "cls" else ""
    return f"{qual}({args})"


def _walk_source(module: str, tree: ast.Module) -> list[DocEntry]:
    out = []
    doc = _clean(ast.get_docstring(tree))
    if doc:
        out.append(DocEntry(module, "module", f"Module {module}", doc))

    def visit(body, prefix, in_class):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_") and node.name != "__init__":
                    continue
                qual = f"{prefix}.{node.name}"
                d = _clean(ast.get_docstring(node))
                if isinstance(node, ast.ClassDef):
                    if d:
                        out.append(DocEntry(qual, "class", f"class {qual}", d))
                    visit(node.body, qual, True)
                elif d and node.name != "__init__":
                    kind = "method" if in_class else "function"
                    out.append(DocEntry(qual, kind, _signature_from_ast(qual, node), d))

    visit(tree.body, module, False)
    return out


def stdlib_source_entries() -> list[DocEntry]:
    """Docstrings of the pure-Python stdlib, parsed (never imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    entries = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("test") for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p.startswith("_") for p in parts):
            continue  # private modules
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken (bad-syntax samples)
        entries.extend(_walk_source(".".join(parts), tree))
    return entries


def inspect_entries() -> list[DocEntry]:
    """Docstrings of builtins (str.split, dict.get, len...) and a few C modules."""
    import importlib

    entries = []
    for modname in _INSPECT_MODULES:
        mod = importlib.import_module(modname)
        shown = "" if modname == "builtins" else modname + "."
        if modname != "builtins" and not modname.startswith("_"):
            d = _clean(mod.__doc__)
            if d:
                entries.append(DocEntry(modname, "module", f"Module {modname}", d, core=True))
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if getattr(obj, "__module__", modname) not in (modname, None):
                continue
            qual = shown + name
            d = _clean(obj.__doc__)
            if inspect.isclass(obj):
                if d:
                    entries.append(DocEntry(qual, "class", f"class {qual}", d, core=True))
                for mname, meth in sorted(vars(obj).items()):
                    if mname.startswith("_") or not callable(meth):
                        continue
                    md = _clean(getattr(meth, "__doc__", None))
                    if md and md != d:
                        entries.append(DocEntry(f"{qual}.{mname}", "method",
                                                _heading_for(f"{qual}.{mname}", meth), md, core=True))
            elif d:
                entries.append(DocEntry(qual, "function", _heading_for(qual, obj), d, core=True))
    return entries


def _heading_for(qual: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return f"{qual}(...)"
    for prefix in ("(self, /, ", "(self, ", "(/, "):
        if sig.startswith(prefix):
            sig = "(" + sig[len(prefix):]
    if sig in ("(self, /)", "(self)", "(/)"):
        sig = "()"
    return qual + sig


def topic_entries() -> list[DocEntry]:
    """The language reference topics shipped in pydoc_data (what help('with') shows)."""
    from pydoc_data.topics import topics

    out = []
    for key, text in sorted(topics.items()):
        text = text.strip()
        title = text.splitlines()[0].strip() if text else key
        body = _clean(text)
        if body:
            out.append(DocEntry(key, "topic", title, body, full=_clean(text, limit=10**9), core=True))
    return out


def all_entries() -> list[DocEntry]:
    seen, out = set(), []
    for e in topic_entries() + inspect_entries() + stdlib_source_entries():
        if e.name in seen or len(e.doc) < 20:
            continue
        seen.add(e.name)
        out.append(e)
    return out


def is_validation(entry: DocEntry, fraction: float = 0.03) -> bool:
    """A stable split: the same entries are held out on every run and every machine."""
    h = int(hashlib.sha1(entry.name.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


# ---- document rendering -------------------------------------------------------------------

_QUESTIONS = {
    "function": ["What does {n} do?", "Explain {n}.", "How do I use {n}?", "What is {n} for?",
                 "Tell me about {n}.", "What does the function {n} do?"],
    "method": ["What does {n} do?", "Explain the {n} method.", "How does {n} work?",
               "What is {n} used for?"],
    "class": ["What is {n}?", "Explain the class {n}.", "What does {n} represent?",
              "Tell me about {n}."],
    "module": ["What is the {n} module for?", "What does the {n} module do?",
               "Explain the {n} module.", "Tell me about {n}."],
    "topic": ["Explain {n}.", "What is {n} in Python?", "How does {n} work in Python?",
              "Tell me about {n}."],
}


def _topic_phrase(e: DocEntry) -> str:
    # "with" -> "the with statement"; keys like "atom-literals" read better as words.
    key = e.name.replace("-", " ")
    title = e.heading.rstrip(".*:").strip().replace('"', "")
    if title.startswith("The "):
        title = "the " + title[4:]
    return title if 3 < len(title) < 60 else f"the {key} statement"


def _first_sentence(doc: str) -> str:
    para = doc.split("\n\n")[0].replace("\n", " ")
    end = para.find(". ")
    return para if end < 0 else para[: end + 1]


def _answer(e: DocEntry) -> str:
    if e.kind in ("function", "method"):
        return f"`{e.heading}`\n\n{e.doc}"
    return e.doc


def _reasoning(e: DocEntry) -> str:
    kind = {"function": "a function", "method": "a method", "class": "a class",
            "module": "a module", "topic": "a part of the language reference"}[e.kind]
    parts = [f"The user asks about {e.name}. It is {kind}"]
    if "." in e.name and e.kind != "topic":
        parts[0] += f" in {e.name.rsplit('.', 1)[0]}"
    parts[0] += "."
    if e.kind in ("function", "method"):
        parts.append(f"Its signature is {e.heading}.")
    parts.append(f"In short: {_first_sentence(e.doc)}")
    parts.append("I will explain it using its documentation.")
    return " ".join(parts)


def plain_document(e: DocEntry) -> str:
    return f"{e.heading}\n\n{e.full or e.doc}"


def chat_messages(e: DocEntry, rng: random.Random, mode: str) -> tuple[list[dict], list[dict] | None]:
    """Messages for one synthetic chat about `e`. mode: instant, thinking or tool."""
    name = _topic_phrase(e) if e.kind == "topic" else e.name
    question = rng.choice(_QUESTIONS[e.kind]).format(n=name)
    msgs = [{"role": "system", "content": DEFAULT_SYSTEM}] if rng.random() < 0.7 else []
    msgs.append({"role": "user", "content": question})
    if mode == "tool":
        args = json.dumps({"name": e.name})
        msgs.append({"role": "assistant", "content": "",
                     "tool_calls": [{"id": "functions.python_help:0", "type": "function",
                                     "function": {"name": "python_help", "arguments": args}}]})
        msgs.append({"role": "tool", "tool_call_id": "functions.python_help:0",
                     "content": plain_document(e)})
        msgs.append({"role": "assistant", "content": _first_sentence(e.doc)})
        return msgs, [HELP_TOOL]
    reply = {"role": "assistant", "content": _answer(e)}
    if mode == "thinking":
        reply["reasoning_content"] = _reasoning(e)
    msgs.append(reply)
    return msgs, None


def make_renderer():
    """Return render(messages, tools=None, add_generation_prompt=False, thinking=True) -> str."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    # Plain JSON (jinja's own tojson HTML-escapes quotes and <>); the engine does the same.
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)
    template = env.from_string(KIMI_CHAT_TEMPLATE)

    def render(messages, tools=None, add_generation_prompt=False, thinking=True):
        return template.render(messages=messages, tools=tools,
                               add_generation_prompt=add_generation_prompt, thinking=thinking)

    return render


def build_documents(seed: int = 0, chat_copies: int = 2, core_copies: int = 6
                    ) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs): plain docs plus chats per entry (`core_copies` for builtins and
    topics, the questions people ask most; `chat_copies` for the rest), shuffled.

    Chat modes per copy: 65% instant, 25% thinking, 10% tool call.
    """
    rng = random.Random(seed)
    render = make_renderer()
    train, val = [], []
    for e in all_entries():
        docs = [plain_document(e)]
        for _ in range(core_copies if e.core else chat_copies):
            r = rng.random()
            mode = "instant" if r < 0.65 else "thinking" if r < 0.9 else "tool"
            msgs, tools = chat_messages(e, rng, mode)
            docs.append(render(msgs, tools=tools))
        (val if is_validation(e) else train).extend(docs)
    rng.shuffle(train)
    return train, val


if __name__ == "__main__":
    tr, va = build_documents()
    print(f"{len(tr)} train docs, {len(va)} val docs, "
          f"{sum(map(len, tr)) / 1e6:.1f} M train chars, {sum(map(len, va)) / 1e6:.2f} M val chars")
    print(tr[0][:800])
    print("-----")
    print(next(d for d in tr if "<think>T" in d)[:800])
