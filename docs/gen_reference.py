"""Generates the ModelDeployment reference (Markdown) from the canonical CRD.

  python docs/gen_reference.py            prints it
  python docs/gen_reference.py --write    replaces the section between the markers in README.md
A test checks README.md is up to date with the CRD.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- BEGIN GENERATED REFERENCE -->", "<!-- END GENERATED REFERENCE -->"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    t = node.get("type", "object")
    if t == "array":
        return f"[]{_type(node.get('items') or {})}"
    if t == "object" and "additionalProperties" in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    return str(t)


def _constraints(node: dict[str, Any]) -> str:
    out = []
    if "enum" in node:
        out.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "default" in node:
        out.append(f"default `{node['default']}`")
    for key, label in (("minimum", "min"), ("maximum", "max"), ("minLength", "min length"),
                       ("maxLength", "max length"), ("maxItems", "max items"), ("minItems", "min items")):
        if key in node:
            out.append(f"{label} {node[key]}")
    if "pattern" in node:
        out.append(f"pattern `{node['pattern']}`")
    return "; ".join(out)


def rows(node: dict[str, Any], path: str, required: set[str]) -> list[str]:
    out = []
    props = node.get("properties") or {}
    if node.get("type") == "array" and "properties" in (node.get("items") or {}):
        props = node["items"]["properties"]
        required = set(node["items"].get("required") or [])
    for name, child in props.items():
        p = f"{path}.{name}" if path else name
        desc = " ".join(str(child.get("description", "")).split())
        req = "yes" if name in required else ""
        cells = [f"`{p}`", _type(child), req, desc, _constraints(child)]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out += rows(child, p + ("[]" if child.get("type") == "array" else ""), set(child.get("required") or []))
    return out


def generate() -> str:
    crd = yaml.safe_load((ROOT / "crds" / "modeldeployments.modelops.dev.yaml").read_text())
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    lines = [f"`{crd['spec']['group']}/{version['name']}` `{crd['spec']['names']['kind']}` "
             f"(short names: {', '.join(crd['spec']['names']['shortNames'])}). "
             "Generated from `crds/modeldeployments.modelops.dev.yaml` by `docs/gen_reference.py`.", "",
             "| Field | Type | Required | Description | Constraints |", "|---|---|---|---|---|"]
    lines += rows(spec, "spec", set(spec.get("required") or []))
    return "\n".join(lines) + "\n"


def main() -> int:
    text = generate()
    if "--write" not in sys.argv:
        print(text)
        return 0
    readme = ROOT / "README.md"
    body = readme.read_text()
    head, _, rest = body.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
