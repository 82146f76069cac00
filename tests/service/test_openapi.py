"""Schemathesis over every route of a live server, valid and invalid inputs: no server error, and
every status, media type and body is one the OpenAPI document describes."""

import shutil
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.jobs.embedded import RedisServer
from tests.service.conftest import start_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 15  # per route and mode: about 250 requests, 30 s on two busy cores


@pytest.fixture(scope="module")
def api(artifact_dir, tmp_path_factory):
    """A server of its own: fuzzed DELETEs may remove its models. Its Redis has no worker, so
    jobs the fuzzer submits wait in the queue instead of calibrating beside the other tests."""
    arts = tmp_path_factory.mktemp("openapi") / "artifacts"
    shutil.copytree(artifact_dir, arts)
    redis = RedisServer(tmp_path_factory.mktemp("openapi-redis"))
    # Fuzzed scripts stay short (the schema's own example asks for 48 frames of tiny-world).
    server = start_server(arts, redis_url=redis.url, video_max_frames="6")
    yield server
    server.stop()
    redis.stop()


def test_every_route_answers_as_the_openapi_document_says(api):
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    by_label = {op.label: op for op in operations}
    calls = Counter()

    def call(label: str, **parts):
        case = by_label[label].Case(**parts)
        calls[label] += 1
        return case.call_and_validate(checks=CHECKS, timeout=60)

    # Success paths, which random inputs rarely reach: an MP4, a job through its life, its events.
    assert call("POST /v1/videos", body={"actions": "right*3", "scale": 1}).status_code == 200
    job = call("POST /v1/quantization-jobs", body={"base_model": "mini", "method": "rtn"}).json()
    for label in ("GET /v1/quantization-jobs/{job_id}", "DELETE /v1/quantization-jobs/{job_id}"):
        assert call(label, path_parameters={"job_id": job["id"]}).status_code == 200
    events = call("GET /v1/quantization-jobs/{job_id}/events", path_parameters={"job_id": job["id"]})
    assert '"status": "cancelled"' in events.text
    assert call("GET /v1/quantization-jobs", query={"status": "cancelled"}).json()[0]["id"] == job["id"]
    assert call("DELETE /v1/models/{model_id}", path_parameters={"model_id": "mini-rtn-w8a8"}).status_code == 204

    for operation in operations:
        has_inputs = bool(operation.body) or bool(list(operation.iter_parameters()))
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_inputs else (GenerationMode.POSITIVE,)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case):
                case.call_and_validate(checks=CHECKS, timeout=60)
                calls[case.operation.label] += 1

            check()

    print(f"schemathesis: {calls.total()} requests over {len(calls)} operations")
    assert set(calls) == {op.label for op in operations}
