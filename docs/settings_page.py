"""The table of docs/settings.md, written from the `Settings` fields, so the page cannot drift.

`make docs` (`python -m docs.settings_page`) rewrites the table between the two markers and leaves
the page's hand-written text alone; tests/test_docs.py fails when the committed table differs.
"""
import types
import typing
from pathlib import Path

from annotated_types import Ge, Gt
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from service.settings import Settings, available_cores

PAGE = Path(__file__).with_name("settings.md")
START = "<!-- The table below is written by `make docs` from service/settings.py: edit the fields' descriptions there. -->"
END = "<!-- End of the generated table. -->"

TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "`true` or `false`",
              Path: "path", SecretStr: "string (secret)"}
FACTORY_DEFAULTS = {available_cores: "the cores this process may use"}


def settings_table() -> str:
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        cells = (f"`{name.upper()}`", _type(field), _default(name, field), field.description or "")
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def page_with_table(page: str) -> str:
    """The page with its generated table replaced by the one the fields give now."""
    before, start, rest = page.partition(START)
    _, end, after = rest.partition(END)
    if not (start and end):
        raise ValueError(f"{PAGE.name} has lost its markers: {START!r} ... {END!r}")
    return f"{before}{START}\n\n{settings_table()}\n{END}{after}"


def _type(field: FieldInfo) -> str:
    annotation, bounds = field.annotation, list(field.metadata)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `X | None`: "unset" says it
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:  # PositiveInt inside a union keeps its bound here
        annotation, *extras = typing.get_args(annotation)
        bounds += extras
    if typing.get_origin(annotation) is typing.Literal:
        return ", ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    name = TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    for bound in bounds:
        if isinstance(bound, Gt):
            name += f" > {bound.gt}"
        elif isinstance(bound, Ge):
            name += f" >= {bound.ge}"
    return name


def _default(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        return FACTORY_DEFAULTS.get(field.default_factory, f"`{field.default_factory.__name__}()`")
    value = field.default
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    shown = f"`{value}`"
    if name.endswith("_bytes") and value % 1024 == 0:  # a size in bytes also in KiB or MiB
        shown += f" ({value // 1024 ** 2} MiB)" if value % 1024 ** 2 == 0 else f" ({value // 1024} KiB)"
    return shown


def main() -> None:
    PAGE.write_text(page_with_table(PAGE.read_text()))
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
