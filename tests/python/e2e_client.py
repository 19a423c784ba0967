"""The end-to-end scenarios, from the user's side: inference through the official `openai` SDK,
the adapter and policy APIs over plain HTTP (what `curl` sends), tokens from `switchyard token`
(passed in the environment as OPS_TOKEN, ACME_TOKEN and GLOBEX_TOKEN).

    e2e_client.py demo BASE_URL DEMO_ADAPTERS
        against `switchyard up`: two tenants routed to different demo adapters, the quickstart
        (load an adapter, use it), the tenant boundaries (a tenant outside the tenants file, an
        adapter used but not owned, metrics off the public port; MALLORY_TOKEN is a token for a
        tenant the demo does not configure; METRICS_URL is the operators' metrics listener), a
        policy change that swaps the routes, an unload then a clean "model not found"
    e2e_client.py fleet URL_A URL_B DEMO_ADAPTERS POLICY_WASM
        against two gateways sharing one etcd store: adapters loaded through either gateway
        serve through the other, and a policy uploaded and activated through one routes requests
        through the other (OPS_TOKEN and ACME_TOKEN)
    e2e_client.py ask BASE_URL MODEL KIND
        one question as ACME_TOKEN's tenant, streamed and not; KIND says what the answer must be
        (uppercase, french, json); exits 3 when the gateway answers 503 (no backend ready yet)

Exits non-zero, naming the check, on the first failure.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

import openai

QUESTION = "What is the capital of France?"


def fail(check: str, detail) -> None:
    print(f"FAILED {check}: {detail}", file=sys.stderr)
    sys.exit(1)


def http(method: str, url: str, token: str, body=None, raw: bytes = None):
    """One request the way curl would send it; returns (status, parsed JSON body)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def client(base: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=120)


def answer(c: openai.OpenAI, model: str, stream: bool) -> tuple:
    """(the answer's text, the adapter the gateway says served it)."""
    messages = [{"role": "user", "content": QUESTION}]
    if not stream:
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=32, temperature=0
        )
        return raw.parse().choices[0].message.content, raw.headers.get("x-switchyard-model")
    parts = []
    for chunk in c.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts), None


def is_uppercase(text: str) -> bool:
    return "PARIS" in text and text == text.upper()


def is_french(text: str) -> bool:
    return "capitale" in text.lower() and "Paris" in text


def is_json(text: str) -> bool:
    try:
        return "Paris" in str(json.loads(text)["answer"])
    except (ValueError, KeyError, TypeError):
        return False


KINDS = {"uppercase": is_uppercase, "french": is_french, "json": is_json}


def expect(c: openai.OpenAI, model: str, kind: str, check: str, served: str = None) -> None:
    """Both ways, the answer is of `kind`; when `served` is given, the response header names it."""
    for stream in (False, True):
        text, by = answer(c, model, stream)
        if not KINDS[kind](text):
            fail(check, f"model {model!r} (stream={stream}) answered {text!r}, not {kind}")
        if served is not None and not stream and by != served:
            fail(check, f"x-switchyard-model is {by!r}, not {served!r}")


def expect_not_found(c: openai.OpenAI, model: str, check: str) -> None:
    try:
        text, _ = answer(c, model, stream=False)
    except openai.NotFoundError as e:
        if e.code != "model_not_found":
            fail(check, f"404 with code {e.code!r}, not model_not_found")
        return
    fail(check, f"model {model!r} still answered {text!r}")


def demo(base: str, adapters: str) -> None:
    ops, acme, globex = (os.environ[f"{t}_TOKEN"] for t in ("OPS", "ACME", "GLOBEX"))
    a, g = client(base, acme), client(base, globex)

    # 1. One request, two tenants: tenant-map routes acme to uppercase and globex to french.
    expect(a, "assistant", "uppercase", "acme is routed to the uppercase adapter", served="uppercase")
    expect(g, "assistant", "french", "globex is routed to the french adapter", served="french")

    # 2. The quickstart: a tenant loads an adapter under its own name, then uses it by name.
    uri = f"file://{adapters}/json"
    status, body = http("POST", f"{base}/v1/loras", acme, {"lora_name": "acme/json", "source": {"uri": uri}})
    if status != 200 or body.get("status") != "success":
        fail("acme loads acme/json", f"{status} {body}")
    status, body = http("GET", f"{base}/v1/loras", acme)
    if status != 200 or "acme/json" not in body["loras"]:
        fail("acme lists acme/json", f"{status} {body}")
    if "acme/json" not in [m.id for m in a.models.list()]:
        fail("acme/json is in acme's /v1/models", [m.id for m in a.models.list()])
    expect(a, "acme/json", "json", "acme/json answers as JSON", served="acme/json")
    status, body = http("GET", f"{base}/v1/loras", globex)
    if "acme/json" in body["loras"]:
        fail("globex does not see acme's adapter", body)
    # globex's policy is not even shown acme's adapter: to tenant-map the name is just another
    # alias, so globex gets its own mapped adapter, never acme's weights.
    expect(g, "acme/json", "french", "globex never reaches acme's adapter", served="french")

    # 3. The tenant boundaries hold as a new user meets them.
    base_model = next(m.id for m in client(base, ops).models.list() if m.parent is None)
    try:
        client(base, os.environ["MALLORY_TOKEN"]).chat.completions.create(
            model=base_model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        fail("a tenant outside the tenants file is refused", "it was served")
    except openai.PermissionDeniedError as e:
        if e.code != "unknown_tenant":
            fail("a tenant outside the tenants file is refused", f"403 with code {e.code!r}")
    status, body = http("DELETE", f"{base}/v1/loras/french", acme)
    if status != 403 or body["error"]["code"] != "adapter_not_owned":
        fail("acme may use french but not unload it (ops owns it)", f"{status} {body}")
    status, body = http("POST", f"{base}/v1/loras", acme,
                        {"lora_name": "uppercase", "source": {"uri": uri}, "hot_swap": True})
    if status != 403 or body["error"]["code"] != "adapter_not_owned":
        fail("acme may not swap the weights of uppercase, which globex uses too", f"{status} {body}")
    expect(g, "assistant", "french", "globex is still served by the weights ops loaded", served="french")
    status, body = http("GET", f"{base}/metrics", acme)
    if status != 404:
        fail("the public port serves no metrics", f"{status} {body}")
    with urllib.request.urlopen(os.environ["METRICS_URL"], timeout=30) as r:
        if 'tenant="acme"' not in r.read().decode():
            fail("operators scrape the metrics on their own listener", "no series for acme")

    # 4. A policy deploy changes the routes: the operator re-activates tenant-map, swapped.
    status, body = http("GET", f"{base}/v1/policies", ops)
    if status != 200:
        fail("ops lists the policies", f"{status} {body}")
    history = body["active"].get("*", [])  # the default's activations, the current one last
    current = history[-1] if history else None
    if not current or current["config"] != {"tenants": {"acme": "uppercase", "globex": "french"}}:
        fail("tenant-map is the active default policy", body["active"])
    swapped = {"tenants": {"acme": "french", "globex": "uppercase"}}
    status, body = http("POST", f"{base}/v1/policies/{current['id']}/activate", ops, {"config": swapped})
    if status != 200:
        fail("ops activates the swapped routes", f"{status} {body}")
    expect(a, "assistant", "french", "after the policy change acme gets french", served="french")
    expect(g, "assistant", "uppercase", "after the policy change globex gets uppercase", served="uppercase")

    # 5. An unload, then a clean "model not found" for whoever is routed to it.
    status, body = http("DELETE", f"{base}/v1/loras/acme/json", acme)
    if status != 200:
        fail("acme unloads acme/json", f"{status} {body}")
    status, body = http("DELETE", f"{base}/v1/loras/french", ops)
    if status != 200:
        fail("ops unloads french", f"{status} {body}")
    status, body = http("GET", f"{base}/v1/loras", ops)
    if "french" in body["loras"] or "acme/json" in body["loras"]:
        fail("the unloaded adapters are gone", body)
    expect_not_found(a, "assistant", "acme's route to the unloaded french adapter is model_not_found")
    expect(g, "assistant", "uppercase", "globex's route is untouched")
    print("demo: all checks passed")


def eventually(check: str, probe, within: float = 10.0) -> None:
    """Retries `probe` (which calls `fail` through `expect`) until it passes or `within` runs out:
    a change reaches the other gateway through the store's watch, within milliseconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            probe()
            return
        except (SystemExit, openai.APIStatusError) as e:
            if time.monotonic() > deadline:
                fail(check, f"never held: {e}")
            time.sleep(0.1)


def fleet(url_a: str, url_b: str, adapters: str, policy: str) -> None:
    ops, acme = os.environ["OPS_TOKEN"], os.environ["ACME_TOKEN"]
    via_a, via_b = client(url_a, acme), client(url_b, acme)

    # 1. An adapter loaded through one gateway serves through the other, and the other way round.
    for base, name in ((url_a, "uppercase"), (url_b, "french")):
        body = {"lora_name": name, "source": {"uri": f"file://{adapters}/{name}"}}
        status, answer_body = http("POST", f"{base}/v1/loras", ops, body)
        if status != 200:
            fail(f"ops loads {name} through {base}", f"{status} {answer_body}")
    expect(via_b, "uppercase", "uppercase", "uppercase, loaded through A, serves through B", served="uppercase")
    expect(via_a, "french", "french", "french, loaded through B, serves through A", served="french")

    # 2. A policy uploaded and activated through A routes acme's requests through B.
    with open(policy, "rb") as f:
        status, body = http("POST", f"{url_a}/v1/policies?name=tenant-map", ops, raw=f.read())
    if status != 201:
        fail("ops uploads tenant-map through A", f"{status} {body}")
    version = body["policy"]["id"]
    def route_acme(through: str, seen_by: openai.OpenAI, adapter: str, check: str) -> None:
        """Activates tenant-map through one gateway, routing acme to `adapter`; the other follows."""
        body = {"config": {"tenants": {"acme": adapter}}}
        status, answer_body = http("POST", f"{through}/v1/policies/{version}/activate", ops, body)
        if status != 200:
            fail(f"ops activates tenant-map through {through}", f"{status} {answer_body}")
        eventually(check, lambda: expect(seen_by, "assistant", adapter, check, served=adapter))

    route_acme(url_a, via_b, "uppercase", "B routes acme by the policy activated through A")
    # 3. And an activation through B re-routes acme on A.
    route_acme(url_b, via_a, "french", "A routes acme by the policy activated through B")
    print("fleet: all checks passed")


def ask(base: str, model: str, kind: str) -> None:
    c = client(base, os.environ["ACME_TOKEN"])
    try:
        expect(c, model, kind, f"{model} answers {kind}")
    except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError) as e:
        if getattr(e, "status_code", 503) == 503:
            print(f"not ready: {e}", file=sys.stderr)
            sys.exit(3)
        raise
    print(f"ask {model}: ok")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "demo":
        demo(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "fleet":
        fleet(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    elif len(sys.argv) == 5 and sys.argv[1] == "ask":
        ask(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
