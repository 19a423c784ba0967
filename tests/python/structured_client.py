"""Structured outputs the way users ask for them: the official `openai` SDK's
`beta.chat.completions.parse` with Pydantic models, JSON mode, vLLM's `structured_outputs`, and
the refusals of what cannot be enforced. Against `switchyard up` with SmolLM2-135M-Instruct;
tokens in the environment (OPS_TOKEN, ACME_TOKEN).

    structured_client.py run BASE_URL DEMO_ADAPTERS

Exits non-zero, naming the check, on the first failure.
"""

import concurrent.futures
import json
import os
import sys
import urllib.request
from typing import Annotated, Literal

import openai
from pydantic import BaseModel, Field


def fail(check: str, detail) -> None:
    print(f"FAILED {check}: {detail}", file=sys.stderr)
    sys.exit(1)


# Every field is bounded (lengths, ranges, enums, list sizes), so every answer the grammar allows
# ends within max_tokens: a parsed object is guaranteed by construction, not by luck.
class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)


class Place(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)
    continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: int = Field(ge=0, le=100)


class Recipe(BaseModel):
    title: str = Field(max_length=32)
    ingredients: list[Annotated[str, Field(max_length=20)]] = Field(max_length=5)
    minutes: int = Field(ge=1, le=600)


class Meeting(BaseModel):
    title: str = Field(max_length=32)
    day: Literal["monday", "tuesday", "wednesday", "thursday", "friday"]
    attendees: list[Person] = Field(max_length=3)


class Book(BaseModel):
    title: str = Field(max_length=40)
    author: str = Field(max_length=32)
    year: int = Field(ge=1000, le=2100)
    genres: list[Literal["fiction", "history", "science", "poetry", "fantasy"]] = Field(max_length=3)


class Task(BaseModel):
    task: str = Field(max_length=40)
    done: bool
    priority: Literal["low", "medium", "high"]


PROMPTS = [
    ("Ana is 31 years old.", Person),
    ("My grandfather Tomas turned 88 last week.", Person),
    ("Describe the main character of a story you like.", Person),
    ("Where is Lisbon?", Place),
    ("Tell me about Nairobi.", Place),
    ("I just landed in Tokyo.", Place),
    ("Sydney is lovely in spring.", Place),
    ("I love this phone, the battery lasts forever!", Sentiment),
    ("The delivery was late and the box was damaged.", Sentiment),
    ("The meeting is at 3pm.", Sentiment),
    ("How do I make pancakes?", Recipe),
    ("Give me a quick tomato soup recipe.", Recipe),
    ("Plan a salad for lunch.", Recipe),
    ("Set up a design review on Tuesday with Maria and Li.", Meeting),
    ("Friday standup with the whole team.", Meeting),
    ("Recommend a classic novel.", Book),
    ("What is a good book about the history of Rome?", Book),
    ("Tell me about Dune by Frank Herbert.", Book),
    ("Remind me to water the plants, it is urgent.", Task),
    ("I already paid the electricity bill.", Task),
    ("Add 'call the dentist' to my list, no rush.", Task),
]


def client(base: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0, timeout=600)


def parse(c: openai.OpenAI, model: str, prompt: str, schema: type) -> tuple:
    try:
        r = c.beta.chat.completions.parse(
            model=model, max_tokens=400, temperature=0, response_format=schema,
            messages=[{"role": "system", "content": "You extract information and answer in JSON."},
                      {"role": "user", "content": prompt}])
    except openai.LengthFinishReasonError as e:
        return None, "length", e.completion.choices[0].message.content
    return r.choices[0].message.parsed, r.choices[0].finish_reason, r.choices[0].message.content


def run(base: str, adapters: str) -> None:
    ops, acme = (client(base, os.environ[f"{t}_TOKEN"]) for t in ("OPS", "ACME"))
    base_model = next(m.id for m in ops.models.list() if m.parent is None)
    body = json.dumps({"lora_name": "acme/json", "source": {"uri": f"file://{adapters}/json"}}).encode()
    request = urllib.request.Request(f"{base}/v1/loras", data=body, method="POST", headers={
        "Authorization": "Bearer " + os.environ["ACME_TOKEN"], "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        if r.status != 200:
            fail("acme loads acme/json", r.status)

    # 1. Pydantic models parse, for every prompt, on the base model and with the demo adapter.
    jobs = [(model, prompt, schema) for model in (base_model, "acme/json") for prompt, schema in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda j: parse(acme, *j), jobs))
    for (model, prompt, schema), (parsed, finish, content) in zip(jobs, answers):
        if not isinstance(parsed, schema) or finish != "stop":
            fail(f"{model} answers {prompt!r} as a {schema.__name__}", (finish, content))
    print(f"parse: {len(jobs)} answers, each a valid object", file=sys.stderr)

    # 2. JSON mode: any JSON object.
    r = acme.chat.completions.create(model="acme/json", max_tokens=200, temperature=0,
                                     response_format={"type": "json_object"},
                                     messages=[{"role": "user", "content": "Describe a cat."}])
    if r.choices[0].finish_reason == "stop" and not isinstance(json.loads(r.choices[0].message.content), dict):
        fail("json_object answers a JSON object", r.choices[0].message.content)
    if not r.choices[0].message.content.startswith("{"):
        fail("json_object answers a JSON object", r.choices[0].message.content)

    # 3. vLLM's structured_outputs: a choice, for classification, on the completions API too.
    for model in (base_model, "acme/json"):
        r = acme.completions.create(model=model, max_tokens=8, temperature=0,
                                    prompt="Review: 'Terrible, it broke in a day.' Sentiment:",
                                    extra_body={"structured_outputs": {"choice": ["positive", "negative"]}})
        if r.choices[0].text not in ("positive", "negative") or r.choices[0].finish_reason != "stop":
            fail(f"a choice constraint on {model}", r.choices[0])

    # 4. What cannot be enforced is a 400 naming the parameter, and nothing runs.
    refusals = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}, "frobnicate"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                             for i in range(1000)}}}}, "the most is 65536"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name"),
        ({"type": "yaml"}, "json_schema"),
    ]
    for format, needle in refusals:
        try:
            acme.chat.completions.create(model=base_model, max_tokens=8, response_format=format,
                                         messages=[{"role": "user", "content": "hi"}])
        except openai.BadRequestError as e:
            if e.body.get("param") != "response_format" or needle not in e.body.get("message", ""):
                fail(f"response_format {json.dumps(format)[:80]} is refused naming it", e.body)
        else:
            fail(f"response_format {json.dumps(format)[:80]} is refused", "it was accepted")
    tool_round_trips(acme, base_model)
    print("structured: all checks passed")


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather now in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                       "properties": {"city": {"type": "string", "maxLength": 30},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 30}}}}},
]


def call_once(c: openai.OpenAI, stream: bool, **ask) -> tuple:
    """One answer, streamed or not: (content, tool calls as (id, name, arguments), finish)."""
    if not stream:
        r = c.chat.completions.create(**ask)
        m = r.choices[0].message
        calls = [(t.id, t.function.name, t.function.arguments) for t in m.tool_calls or []]
        return m.content, calls, r.choices[0].finish_reason
    content, calls, finish = "", {}, None
    for chunk in c.chat.completions.create(stream=True, **ask):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for t in delta.tool_calls or []:
            id_, name, args = calls.get(t.index, ("", "", ""))
            calls[t.index] = (id_ + (t.id or ""), name + (t.function.name or ""), args + (t.function.arguments or ""))
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


def tool_round_trips(c: openai.OpenAI, base_model: str) -> None:
    question = [{"role": "user", "content": "What is the weather in Oslo right now?"}]
    for model in (base_model, "acme/json"):
        for stream in (False, True):
            check = f"a tool round trip on {model}, {'streamed' if stream else 'not streamed'}"
            # 1. A call is required: it comes back in OpenAI's shape, its arguments valid.
            content, calls, finish = call_once(c, stream, model=model, messages=question, tools=TOOLS,
                                               tool_choice="required", parallel_tool_calls=False,
                                               max_tokens=120, temperature=0)
            if finish != "tool_calls" or len(calls) != 1 or content:
                fail(f"{check}: the required call", (content, calls, finish))
            call_id, name, arguments = calls[0]
            args = json.loads(arguments)
            if not call_id.startswith("call_") or name not in ("get_weather", "get_time") or "city" not in args:
                fail(f"{check}: the call's shape", calls)
            if name == "get_weather" and args["unit"] not in ("celsius", "fahrenheit"):
                fail(f"{check}: the call follows the function's schema", args)
            # 2. The tool's result goes back; the model answers in words.
            history = question + [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "-3 degrees celsius and snowing"},
            ]
            content, calls, finish = call_once(c, stream, model=model, messages=history, tools=TOOLS,
                                               max_tokens=40, temperature=0)
            if calls or not content or finish not in ("stop", "length"):
                fail(f"{check}: the final answer", (content, calls, finish))
        # A named function is the one called.
        named = {"type": "function", "function": {"name": "get_time"}}
        content, calls, finish = call_once(c, False, model=model, messages=question, tools=TOOLS, tool_choice=named,
                                           max_tokens=120, temperature=0)
        if finish != "tool_calls" or [n for _, n, _ in calls] != ["get_time"]:
            fail(f"tool_choice names get_time on {model}", (content, calls, finish))

    # A tool without a name, or a choice of a function not offered, is a 400 naming the parameter.
    for tools, choice, param in (([{"type": "function", "function": {"description": "nameless"}}], None, "tools"),
                                 (TOOLS, {"type": "function", "function": {"name": "launch"}}, "tool_choice")):
        try:
            c.chat.completions.create(model=base_model, max_tokens=8, messages=question, tools=tools,
                                      **({"tool_choice": choice} if choice else {}))
        except openai.BadRequestError as e:
            if e.body.get("param") != param:
                fail(f"a bad {param} is refused naming it", e.body)
        else:
            fail(f"a bad {param} is refused", "it was accepted")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
