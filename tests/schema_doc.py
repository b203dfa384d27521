"""The README's JSON field lists, rendered from the package's schemas (their ``description``s), so that the
README cannot drift from ``src/paramsurgeon/schemas/*.json``.

In the README, a ``<!-- schema: NAME -->`` line and a ``<!-- /schema -->`` line hold the rendered fields of
``schemas/NAME.json``. ``python tests/test_readme.py --update`` rewrites them (with the examples' outputs);
tests/test_docs.py checks that they are what the schemas give and that every field has a description.
"""

import html
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMAS = os.path.join(ROOT, "src", "paramsurgeon", "schemas")
MARKUP = re.compile(r"[\\`*_<>\[\]]")  # escaped in a description: it is plain text, not markdown
BLOCK = re.compile(r"(<!-- schema: ([\w-]+) -->\n).*?(<!-- /schema -->)", re.S)


def load(name: str) -> dict:
    with open(os.path.join(SCHEMAS, f"{name}.json")) as f:
        return json.load(f)


def names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(SCHEMAS) if f.endswith(".json"))


class Fields:
    """Walks one schema's properties, nested ones included, as (depth, name, node, required) rows."""

    def __init__(self, schema: dict):
        self.defs = schema.get("$defs", {})
        self.expanded: dict[str, str] = {}  # a $def -> the first field that showed its fields
        self.rows: list[tuple[int, str, str, str]] = []  # depth, name, kind, description as markdown
        self.missing: list[str] = []  # fields without a description
        self.walk(schema, 0, "", ())

    def resolve(self, node: dict) -> tuple[dict, str | None]:
        ref = node.get("$ref")
        return (self.defs[ref.split("/")[-1]], ref.split("/")[-1]) if ref else (node, None)

    def kinds(self, node: dict) -> list[str]:
        """The alternatives a value may be: 'string', '"nan"', 'list of integers', ..."""
        node, _ = self.resolve(node)
        if "const" in node:
            return [f"always {json.dumps(node['const'])}"]
        if "enum" in node:
            return [json.dumps(v) for v in node["enum"]]
        if "oneOf" in node:
            return [k for alternative in node["oneOf"] for k in self.kinds(alternative)]
        types = node.get("type", [])
        out = []
        for t in [types] if isinstance(types, str) else types:
            if t == "array" and "items" in node:
                item = " or ".join(plural(k) for k in self.kinds(node["items"]))
                out.append(f"list of {item}")
            else:
                out.append(t)
        return out or ["any"]

    def objects(self, node: dict) -> list[tuple[dict, str | None]]:
        """The objects whose properties a field's value holds, with the $def each comes from."""
        node, ref = self.resolve(node)
        if "properties" in node:
            return [(node, ref)]
        found = []
        for inner in ([node["items"]] if "items" in node else []) + node.get("oneOf", []) + (
                [node["additionalProperties"]] if isinstance(node.get("additionalProperties"), dict) else []):
            found += self.objects(inner)
        return found

    def walk(self, node: dict, depth: int, path: str, refs: tuple[str, ...]) -> None:
        for obj, ref in self.objects(node):
            if ref in refs:  # a recursive definition (a tree's children): shown once
                continue
            for name, field in obj["properties"].items():
                where = f"{path}.{name}" if path else name
                description = field.get("description") or self.resolve(field)[0].get("description")
                if not description:
                    self.missing.append(where)
                kinds = self.kinds(field)
                kind = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0]
                if name not in obj.get("required", []):
                    kind += "; optional"
                inner = {r for _, r in self.objects(field)} - {None}
                shown = [r for r in inner if r in self.expanded]
                text = plain(description or "")
                if shown:
                    text += f" (each as in `{self.expanded[shown[0]]}`)"
                self.rows.append((depth, name, kind, text))
                if not shown:
                    self.expanded.update({r: where for r in inner})
                    self.walk(field, depth + 1, where, refs + ((ref,) if ref else ()))


def plural(kind: str) -> str:
    """'integer' -> 'integers', 'list of strings' -> 'lists of strings'; a literal ('"nan"') stays."""
    if kind.startswith("list of"):
        return "lists" + kind[4:]
    return kind if kind.startswith('"') else kind + "s"


def plain(text: str) -> str:
    """``text`` as markdown shows it as written (``__metadata__``, ``<stdin>``)."""
    return MARKUP.sub(lambda m: "\\" + m.group(0), text)


def render(name: str) -> str:
    """The markdown of schemas/NAME.json: its title and a nested list of its fields."""
    schema = load(name)
    path = f"src/paramsurgeon/schemas/{name}.json"
    title = html.escape(schema["title"].removeprefix("paramsurgeon "))
    lines = [f'<details><summary><code>{title}</code>: '
             f'<a href="{path}">{name}.json</a></summary>', ""]
    lines += [f"{'  ' * depth}- `{field}` ({kind}): {description}"
              for depth, field, kind, description in Fields(schema).rows]
    return "\n".join(lines + ["", "</details>", ""])


def render_readme(text: str) -> str:
    """``text`` with every schema block rendered afresh."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(3), text)


def undocumented() -> list[str]:
    """Every schema field without a description, as 'NAME: path'."""
    return [f"{name}: {where}" for name in names() for where in Fields(load(name)).missing]
