"""Every error a client can cause answers as JSON with a stable code, found by its class hierarchy."""
import inspect
from pathlib import Path

import orjson
import pytest

from service import errors
from service.error_responses import ERRORS, error_response
from service.errors import ServiceError, UndecodableImage

SAMPLE = {str: "x", int: 3, float: 1.5, list[str]: ["a", "b"], str | None: None, int | None: None}


def every_subclass(kind: type) -> list[type]:
    return [sub for direct in kind.__subclasses__() for sub in (direct, *every_subclass(direct))]


def instance(kind: type[ServiceError]) -> ServiceError:
    parameters = list(inspect.signature(kind.__init__).parameters.values())[1:]
    return kind(*(SAMPLE[p.annotation] for p in parameters if p.default is p.empty))


SERVICE_ERRORS = [kind for kind in every_subclass(ServiceError) if kind.__module__ == errors.__name__]


@pytest.mark.parametrize("kind", SERVICE_ERRORS, ids=lambda kind: kind.__name__)
def test_every_service_error_renders_as_json_with_its_own_code(kind):
    response = error_response(instance(kind))
    body = orjson.loads(response.body)
    assert response.media_type == "application/json"
    assert 400 <= response.status_code < 600
    assert kind in ERRORS, f"{kind.__name__} has no entry of its own in error_responses.ERRORS"
    assert body["code"] == ERRORS[kind][1] and body["error"]


def test_codes_are_unique_so_a_client_can_branch_on_them():
    codes = [code for _, code in ERRORS.values()]
    assert len(codes) == len(set(codes))


def test_a_subclass_left_out_of_the_table_answers_as_its_parent_not_a_bare_500():
    class WeirdImage(UndecodableImage):
        pass

    response = error_response(WeirdImage("odd"))
    assert response.status_code == 400
    assert orjson.loads(response.body)["code"] == "undecodable_image"


def test_the_errors_module_knows_nothing_of_http():
    imported = {line.split()[1] for line in inspect.getsource(errors).splitlines()
                if line.startswith(("import ", "from "))}
    assert imported <= {"collections.abc", "types"}, imported


def test_every_code_is_documented_in_the_api_page():
    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    missing = [code for _, code in ERRORS.values() if f"`{code}`" not in page]
    assert not missing, f"docs/api.md's error table lacks {missing}"
