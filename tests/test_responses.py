"""/v1/responses end to end over real HTTP: the openai SDK and the OpenAI Agents SDK against scripted upstreams."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import openai
import orjson
import pytest

from router_model import KeywordRouter, Message, RouteResult
from tests.conftest import REDIS_URL
from tests.harness import Upstream, free_port, run_gateway, scripted_upstream, vllm_expert_config

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"


class RecordingRouter(KeywordRouter):
    """The keyword router, keeping every conversation it was asked to route."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Sequence[Message]] = []

    def route_batch(self, conversations: Sequence[Sequence[Message]]) -> list[RouteResult]:
        self.seen.extend(conversations)
        return super().route_batch(conversations)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    with scripted_upstream("math") as math, scripted_upstream("general") as general:
        yield {"math": math, "general": general}


@pytest.fixture(scope="module")
def router() -> RecordingRouter:
    return RecordingRouter()


@pytest.fixture(scope="module")
def gateway(upstreams: dict[str, Upstream], router: RecordingRouter) -> Iterator[str]:
    config = {
        "experts": [vllm_expert_config("math", upstreams["math"]),
                    vllm_expert_config("general", upstreams["general"])],
        "default_expert": "general",
        "cache": {"backend": "memory"},
        "auth": {"api_keys_env": None, "api_keys": [KEY_A, KEY_B]},
    }
    with run_gateway(config, router=router) as url:
        yield url


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY_A, max_retries=0)


@pytest.fixture
def other_client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY_B, max_retries=0)


def test_create_routes_and_answers_in_the_response_shape(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="auto", input="solve the equation x + 2 = 5")
    response = raw.parse()
    assert raw.headers["x-octoroute-expert"] == "math"
    assert raw.headers["x-octoroute-cache"] == "bypass" and raw.headers["x-request-id"]
    assert float(raw.headers["x-octoroute-route-ms"]) >= 0 and 0 < float(raw.headers["x-octoroute-confidence"]) <= 1
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.output_text == "math: solve the equation x + 2 = 5"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text"
    assert response.usage is not None and response.usage.input_tokens == 7
    assert response.usage.output_tokens == 9 and response.usage.total_tokens == 16
    assert response.incomplete_details is None and response.error is None
    assert "output_text" not in raw.http_response.json()  # an SDK convenience, not a wire field


def test_instructions_and_parameters_reach_the_expert(client: openai.OpenAI, upstreams: dict[str, Upstream]) -> None:
    response = client.responses.create(model="general", input=[{"role": "user", "content": "one two three"}],
                                       instructions="Answer briefly.", max_output_tokens=2, temperature=0.5,
                                       top_p=0.9, metadata={"ticket": "42"})
    body = upstreams["general"].stats()["last_body"]
    assert body["messages"] == [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "one two three"}]
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (2, 0.5, 0.9)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "general: one" and response.metadata == {"ticket": "42"}
    assert response.instructions == "Answer briefly." and response.max_output_tokens == 2


def test_stream_sends_the_typed_events_in_order(client: openai.OpenAI) -> None:
    with client.responses.stream(model="math", input="add two numbers") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    n_deltas = types.count("response.output_text.delta")
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n_deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert n_deltas == 4
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "math: add two numbers" and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 4
    assert events[0].response.id == final.id and final.id.startswith("resp_")
    assert client.responses.retrieve(final.id).output_text == final.output_text  # streamed answers are stored too


def test_stream_wire_format_has_event_names_and_no_done_sentinel(gateway: str) -> None:
    with httpx.stream("POST", f"{gateway}/v1/responses", headers={"Authorization": f"Bearer {KEY_A}"},
                      json={"model": "general", "input": "hi", "stream": True}, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-octoroute-expert"] == "general"
        text = r.read().decode()
    assert "[DONE]" not in text
    blocks = [b for b in text.split("\n\n") if b]
    assert blocks[0].startswith("event: response.created\ndata: {")
    assert blocks[-1].startswith("event: response.completed\n")


def test_stream_cut_by_max_output_tokens_ends_incomplete(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="general", input="one two three", max_output_tokens=2, stream=True))
    assert [e.type for e in events][-4:] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done", "response.incomplete"]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens" and final.output[0].status == "incomplete"
    assert final.output_text == "general: one"


def test_client_leaving_mid_stream_cancels_the_expert_call(gateway: str, upstreams: dict[str, Upstream]) -> None:
    math = upstreams["math"]
    math.control("slow_chunks", delay_s=2)
    cancelled = math.stats()["cancelled"]
    try:
        with httpx.stream("POST", f"{gateway}/v1/responses", headers={"Authorization": f"Bearer {KEY_A}"},
                          json={"model": "math", "input": "a b c d e f", "stream": True}, timeout=10) as r:
            for line in r.iter_lines():
                if line == "event: response.output_text.delta":
                    break  # hang up after the first token
        deadline = time.monotonic() + 5
        while math.stats()["cancelled"] == cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        math.control("ok")
    assert math.stats()["cancelled"] == cancelled + 1


def test_chain_rebuilds_the_conversation_and_the_router_sees_it_whole(
        client: openai.OpenAI, upstreams: dict[str, Upstream], router: RecordingRouter) -> None:
    first = client.responses.create(model="auto", input="solve the equation x + 2 = 5", instructions="Be brief.")
    second = client.responses.create(model="auto", input="thanks, and then?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    body = upstreams["general"].stats()["last_body"]  # the new turn has no math keyword: general answers
    assert body["messages"] == [{"role": "user", "content": "solve the equation x + 2 = 5"},
                                {"role": "assistant", "content": "math: solve the equation x + 2 = 5"},
                                {"role": "user", "content": "thanks, and then?"}]  # instructions not carried over
    assert [(m.role, m.content) for m in router.seen[-1]] == [(m["role"], m["content"]) for m in body["messages"]]
    third = client.responses.create(model="math", input="once more", previous_response_id=second.id)
    assert [m["content"] for m in upstreams["math"].stats()["last_body"]["messages"]] == [
        "solve the equation x + 2 = 5", "math: solve the equation x + 2 = 5", "thanks, and then?",
        "general: thanks, and then?", "once more"]
    assert third.output_text == "math: once more"


def test_retrieve_input_items_and_delete(client: openai.OpenAI) -> None:
    created = client.responses.create(model="general", input=[
        {"role": "developer", "content": "Be nice."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}])
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    items = client.responses.input_items.list(created.id)
    assert [(i.type, i.role) for i in items.data] == [("message", "user"), ("message", "developer")]  # desc
    assert all(i.id.startswith("msg_") for i in items.data)
    asc = client.responses.input_items.list(created.id, order="asc", limit=1)
    assert [i.role for i in asc.data] == ["developer"] and asc.has_more
    rest = client.responses.input_items.list(created.id, order="asc", after=asc.data[0].id)
    assert [i.role for i in rest.data] == ["user"] and not rest.has_more
    deleted = client.responses.delete(created.id)  # the SDK returns None for DELETE
    assert deleted is None
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(created.id)
    assert err.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model="general", input="hi", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="general", input="again", previous_response_id=response.id)
    assert err.value.code == "previous_response_not_found"


def test_another_key_cannot_see_or_continue_a_response(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    mine = client.responses.create(model="general", input="my secret")
    with pytest.raises(openai.NotFoundError):
        other_client.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other_client.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        other_client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError) as err:
        other_client.responses.create(model="general", input="and?", previous_response_id=mine.id)
    assert err.value.code == "previous_response_not_found" and err.value.param == "previous_response_id"
    assert client.responses.retrieve(mine.id).output_text == "general: my secret"  # still there for its owner


def test_backend_failing_mid_stream_ends_with_response_failed(client: openai.OpenAI,
                                                              upstreams: dict[str, Upstream]) -> None:
    upstreams["math"].control("die_after", chunks=2)
    try:
        events = list(client.responses.create(model="math", input="one two three four five", stream=True))
    finally:
        upstreams["math"].control("ok")
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.failed" and "response.completed" not in types
    assert types.count("response.output_text.delta") == 2
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"
    assert "math" in failed.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.NotFoundError):  # a failed response is not kept
        client.responses.retrieve(failed.id)


def test_deterministic_requests_use_the_cache_streamed_or_not(gateway: str, client: openai.OpenAI) -> None:
    ask = {"model": "math", "input": "compute 12 squared", "temperature": 0}
    first = client.responses.with_raw_response.create(**ask)  # type: ignore[call-overload]
    again = client.responses.with_raw_response.create(**ask)  # type: ignore[call-overload]
    assert (first.headers["x-octoroute-cache"], again.headers["x-octoroute-cache"]) == ("miss", "hit")
    assert again.parse().output_text == first.parse().output_text and again.parse().id != first.parse().id
    with client.responses.stream(**ask) as stream:  # a cache hit replayed as events
        assert [e.type for e in stream][-1] == "response.completed"
        assert stream.get_final_response().output_text == "math: compute 12 squared"


def test_text_format_becomes_the_chat_response_format(client: openai.OpenAI,
                                                      upstreams: dict[str, Upstream]) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    response = client.responses.create(model="math", input="x?", text={"format": {
        "type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert upstreams["math"].stats()["last_body"]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    client.responses.create(model="math", input="x?", text={"format": {"type": "text"}})
    assert "response_format" not in upstreams["math"].stats()["last_body"]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "auto"}, 400, "input"),
    ({"model": "auto", "input": []}, 400, "input"),
    ({"model": "auto", "input": "hi", "temperature": 3}, 400, "temperature"),
    ({"model": "auto", "input": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "auto", "input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"model": "auto", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input"),
    ({"model": "auto", "input": [{"type": "reasoning", "summary": []}]}, 400, "input"),
    ({"model": "auto", "input": [{"role": "user", "content": "hi"},
                                 {"type": "function_call_output", "call_id": "nope", "output": "x"}]}, 400, "input"),
    ({"model": "auto", "input": "hi", "background": True}, 400, "background"),
    ({"model": "auto", "input": "hi", "max_output_tokens": 10**9}, 400, "max_output_tokens"),
    ({"model": "nope", "input": "hi"}, 404, "model"),
    ({"model": "auto", "input": "hi", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
])
def test_bad_input_gets_an_openai_shaped_4xx(gateway: str, body: dict[str, Any], status: int, param: str) -> None:
    r = httpx.post(f"{gateway}/v1/responses", headers={"Authorization": f"Bearer {KEY_A}"}, json=body, timeout=10)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").split(".")[0].split("[")[0] == param, error


def test_unknown_ids_and_bad_queries(gateway: str) -> None:
    auth = {"Authorization": f"Bearer {KEY_A}"}
    for method, path in (("GET", "/v1/responses/resp_x"), ("DELETE", "/v1/responses/resp_x"),
                         ("GET", "/v1/responses/resp_x/input_items")):
        r = httpx.request(method, f"{gateway}{path}", headers=auth, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
    r = httpx.get(f"{gateway}/v1/responses/resp_x/input_items?limit=0", headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    assert httpx.get(f"{gateway}/v1/responses/resp_x", timeout=10).status_code == 401


def test_metrics_and_openapi_cover_the_endpoint(gateway: str, client: openai.OpenAI) -> None:
    client.responses.create(model="general", input="count me")
    metrics = httpx.get(f"{gateway}/metrics", timeout=10).text
    assert 'endpoint="responses"' in metrics
    schema = httpx.get(f"{gateway}/openapi.json", timeout=10).json()
    assert {"post"} <= set(schema["paths"]["/v1/responses"])
    assert {"get", "delete"} <= set(schema["paths"]["/v1/responses/{response_id}"])
    assert "/v1/responses/{response_id}/input_items" in schema["paths"]
    assert "ResponsesRequest" in schema["components"]["schemas"]


# -- function tools: the openai SDK and the OpenAI Agents SDK ---------------------------------------------

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_function_call_round_trip(client: openai.OpenAI, upstreams: dict[str, Upstream]) -> None:
    asked = client.responses.create(model="math", input="Paris", tools=[WEATHER_TOOL], tool_choice="auto")  # type: ignore[list-item]
    [call] = asked.output
    assert call.type == "function_call" and call.name == "get_weather" and orjson.loads(call.arguments) == {
        "city": "Paris"}
    sent = upstreams["math"].stats()["last_body"]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER_TOOL["parameters"]}}]
    assert sent["tool_choice"] == "auto"
    answered = client.responses.create(model="math", previous_response_id=asked.id, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                       input=[{"type": "function_call_output", "call_id": call.call_id,
                                               "output": "sunny"}])
    assert answered.output_text == "math: sunny"
    assert upstreams["math"].stats()["last_body"]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]


def test_streamed_function_call_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model="math", input="Oslo", tools=[WEATHER_TOOL]) as stream:  # type: ignore[list-item]
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    [call] = final.output
    assert call.type == "function_call" and orjson.loads(call.arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("streamed", [False, True])
async def test_agents_sdk_runs_a_function_tool_agent(gateway: str, streamed: bool) -> None:
    import agents

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=KEY_A, max_retries=0)
    agent = agents.Agent(name="forecaster", instructions="Use the tool.", tools=[get_weather],
                         model=agents.OpenAIResponsesModel(model="math", openai_client=client))
    run_config = agents.RunConfig(tracing_disabled=True)
    if streamed:
        result: Any = agents.Runner.run_streamed(agent, "Rome", run_config=run_config)
        async for _ in result.stream_events():
            pass
    else:
        result = await agents.Runner.run(agent, "Rome", run_config=run_config)
    assert calls == ["Rome"]
    assert result.final_output == "math: sunny in Rome"
    await client.close()


# -- a backend without function calling; stored responses on Redis, expiring -------------------------------


def test_expert_without_function_calling_refuses_tools_by_name(upstreams: dict[str, Upstream]) -> None:
    from gateway.config import ExpertConfig
    from gateway.experts.vllm import VllmExpert

    class NoTools(VllmExpert):  # stands in for a local expert: no function calling, no response formats
        unsupported = frozenset({"tools", "tool_choice", "response_format"})

    cfg = vllm_expert_config("plain", upstreams["general"])
    config = {"experts": [cfg], "default_expert": "plain", "cache": {"backend": "none"},
              "auth": {"api_keys_env": None}}
    with run_gateway(config, router=KeywordRouter(), experts={"plain": NoTools(ExpertConfig(**cfg))}) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model="plain", input="Paris", tools=[WEATHER_TOOL])  # type: ignore[list-item]
        assert err.value.param == "tools" and "'plain'" in err.value.message
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model="plain", input="hi", text={"format": {"type": "json_object"}})
        assert err.value.param == "text.format" and "text.format" in err.value.message
        assert c.responses.create(model="plain", input="hi").output_text == "general: hi"  # its upstream's name


def test_redis_store_expires_responses(upstreams: dict[str, Upstream], redis_prefix: str) -> None:
    config = {"experts": [vllm_expert_config("general", upstreams["general"])],
              "cache": {"backend": "redis", "url": REDIS_URL, "key_prefix": redis_prefix, "timeout_ms": 500},
              "default_expert": "general", "responses": {"ttl_s": 1}, "auth": {"api_keys_env": None}}
    with run_gateway(config, router=KeywordRouter()) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        created = c.responses.create(model="general", input="short-lived")
        assert c.responses.retrieve(created.id).output_text == "general: short-lived"
        chained = c.responses.create(model="general", input="next", previous_response_id=created.id)
        assert chained.output_text == "general: next"
        time.sleep(1.2)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError) as err:
            c.responses.create(model="general", input="late", previous_response_id=created.id)
        assert err.value.code == "previous_response_not_found"


def test_store_that_does_not_answer_is_a_503_not_a_404(upstreams: dict[str, Upstream]) -> None:
    config = {"experts": [vllm_expert_config("general", upstreams["general"])], "default_expert": "general",
              "cache": {"backend": "redis", "url": f"redis://127.0.0.1:{free_port()}/0", "timeout_ms": 100},
              "auth": {"api_keys_env": None}}
    with run_gateway(config, router=KeywordRouter()) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        created = c.responses.create(model="general", input="hi")  # answered; storing it failed (logged)
        assert created.output_text == "general: hi"
        for call in (lambda: c.responses.retrieve(created.id),
                     lambda: c.responses.create(model="general", input="more", previous_response_id=created.id)):
            with pytest.raises(openai.InternalServerError) as err:
                call()
            assert err.value.status_code == 503 and err.value.code == "service_unavailable"
            assert err.value.response.headers["retry-after"] == "1"


def test_replicas_sharing_redis_and_the_cache_secret_continue_each_others_chains(
        upstreams: dict[str, Upstream], redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCTOROUTE_CACHE_SECRET", "replica-secret")
    config = {"experts": [vllm_expert_config("general", upstreams["general"])], "default_expert": "general",
              "cache": {"backend": "redis", "url": REDIS_URL, "key_prefix": redis_prefix, "timeout_ms": 500},
              "auth": {"api_keys_env": None}}
    with run_gateway(config, router=KeywordRouter()) as one, run_gateway(config, router=KeywordRouter()) as two:
        first = openai.OpenAI(base_url=f"{one}/v1", api_key="x", max_retries=0).responses.create(
            model="general", input="remember me")
        other = openai.OpenAI(base_url=f"{two}/v1", api_key="x", max_retries=0)
        assert other.responses.retrieve(first.id).output_text == "general: remember me"
        other.responses.create(model="general", input="and now?", previous_response_id=first.id)
    assert [m["content"] for m in upstreams["general"].stats()["last_body"]["messages"]] == [
        "remember me", "general: remember me", "and now?"]
