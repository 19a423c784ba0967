"""Drives a running Switchyard gateway the way users do: tokens minted with PyJWT, inference
through the official `openai` SDK, the adapter API over plain HTTP.

    gateway_client.py keys DIR
        writes the signing keys (HS256 secret; RS256, ES256 and EdDSA key pairs) into DIR
    gateway_client.py run BASE_URL DIR ADAPTER_DIR
        runs every check against the gateway at BASE_URL, which verifies tokens with DIR's
        keys and whose tenant `ops` may load file:// adapters from ADAPTER_DIR's parent

Exits non-zero, naming the check, on the first failure.
"""

import base64
import hashlib
import hmac
import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import openai
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://issuer.switchyard.test"
AUDIENCE = "switchyard"
PEM = serialization.Encoding.PEM


def write_keys(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "hs256.secret").write_text(secrets.token_hex(32))
    pairs = {
        "rs256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "es256": ec.generate_private_key(ec.SECP256R1()),
        "eddsa": ed25519.Ed25519PrivateKey.generate(),
    }
    for name, key in pairs.items():
        private = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        public = key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (d / f"{name}.key").write_bytes(private)
        (d / f"{name}.pub").write_bytes(public)


class Keys:
    def __init__(self, d: Path):
        self.hs256 = (d / "hs256.secret").read_text().strip().encode()
        self.private = {alg: (d / f"{alg.lower()}.key").read_bytes() for alg in ("RS256", "ES256", "EdDSA")}
        self.rs256_public = (d / "rs256.pub").read_bytes()

    def mint(self, who, scopes="", alg="HS256", **overrides):
        """A token for tenant `who`; keyword arguments replace claims (None removes one)."""
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-of-{who}", "tenant": who,
                  "scope": scopes, "iat": now, "exp": now + 600}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        key = self.hs256 if alg == "HS256" else self.private[alg]
        return jwt.encode(claims, key, algorithm=alg)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, claims: dict) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())


CHECKS = []


def check(name):
    def wrap(fn):
        CHECKS.append((name, fn))
        return fn
    return wrap


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


class Answer:
    def __init__(self, status_code: int, text: str):
        self.status_code, self.text = status_code, text

    def json(self):
        return json.loads(self.text)


class Http:
    """The adapter API over plain HTTP (the standard library's client)."""

    def __init__(self, base_url: str):
        self.base_url = base_url

    def call(self, method, path, headers=None, json_body=None):
        data = None if json_body is None else json.dumps(json_body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=dict(headers or {}))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return Answer(r.status, r.read().decode())
        except urllib.error.HTTPError as e:
            return Answer(e.code, e.read().decode())

    def get(self, path, headers=None):
        return self.call("GET", path, headers)

    def post(self, path, headers=None, json=None):
        return self.call("POST", path, headers, json)

    def delete(self, path, headers=None):
        return self.call("DELETE", path, headers)


def run(base_url: str, keys: Keys, adapter_dir: Path) -> None:
    http = Http(base_url)
    admin = {"Authorization": "Bearer " + keys.mint("ops", "lora:load lora:read lora:unload")}
    sdk = lambda token: openai.OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0, timeout=60)
    acme = sdk(keys.mint("acme"))
    state = {}

    @check("the adapter API loads an adapter for tenant acme (Dynamo's response shape)")
    def _():
        r = http.post("/v1/loras", headers=admin,
                      json={"lora_name": "acme/support", "source": {"uri": adapter_dir.as_uri()}})
        expect(r.status_code == 200, f"load: {r.status_code} {r.text}")
        body = r.json()
        expect(body["status"] == "success" and body["lora_name"] == "acme/support", body)
        expect(isinstance(body["lora_id"], int) and 0 < body["lora_id"] < 2**31, body)
        expect(all(b["status"] == "loaded" for b in body["backends"]), body)
        listed = http.get("/v1/loras", headers=admin).json()
        expect(listed["loras"] == {"acme/support": body["lora_id"]} and listed["count"] == 1, listed)

    @check("/v1/models lists the base model and the tenant's adapter with parent = base")
    def _():
        models = {m.id: m for m in acme.models.list().data}
        bases = [m for m in models.values() if m.parent is None]
        expect(len(bases) == 1, f"one base model: {list(models)}")
        state["base"] = bases[0].id
        expect("acme/support" in models and models["acme/support"].parent == state["base"], models)
        beta_models = [m.id for m in sdk(keys.mint("beta")).models.list().data]
        expect("acme/support" not in beta_models, f"beta sees acme's adapter: {beta_models}")

    for alg in ("HS256", "RS256", "ES256", "EdDSA"):
        @check(f"a PyJWT {alg} token is accepted for a chat completion")
        def _(alg=alg):
            client = sdk(keys.mint("acme", alg=alg))
            r = client.chat.completions.create(model=state["base"], max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Hello"}])
            expect(r.choices[0].finish_reason in ("stop", "length"), r)

    for model in ("acme/support", "base"):
        @check(f"chat completion, not streamed, model = {model}")
        def _(model=model):
            name = state["base"] if model == "base" else model
            r = acme.chat.completions.create(model=name, max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": "Tell me a story"}])
            expect(r.object == "chat.completion" and r.model == name, r)
            expect(r.choices[0].message.role == "assistant", r)
            expect(isinstance(r.choices[0].message.content, str), r)
            expect(r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)
            state[f"chat:{model}"] = r.choices[0].message.content

        @check(f"chat completion, streamed with usage, model = {model}")
        def _(model=model):
            name = state["base"] if model == "base" else model
            stream = acme.chat.completions.create(model=name, max_tokens=8, temperature=0, stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "Tell me a story"}])
            text, finish, usage = "", None, None
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    usage = chunk.usage
            expect(finish in ("stop", "length"), finish)
            expect(usage is not None and usage.completion_tokens >= 1, usage)
            expect(text == state[f"chat:{model}"], f"stream {text!r} != non-stream {state[f'chat:{model}']!r}")

        @check(f"completion, streamed and not, model = {model}")
        def _(model=model):
            name = state["base"] if model == "base" else model
            r = acme.completions.create(model=name, prompt="Once upon a time", max_tokens=8, temperature=0)
            expect(r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length"), r)
            streamed = "".join(c.choices[0].text for c in acme.completions.create(
                model=name, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if c.choices)
            expect(streamed == r.choices[0].text, f"{streamed!r} != {r.choices[0].text!r}")
            state[f"completion:{model}"] = r.choices[0].text

    @check("sampling knobs reach the model: a +100 logit bias makes one token certain, greedy or not")
    def _():
        # Token 277 is "yard" in the test model's vocabulary.
        for temperature in (0, 1.2):
            r = acme.completions.create(model=state["base"], prompt="Once upon a time", max_tokens=4,
                                        temperature=temperature, logit_bias={"277": 100})
            expect(r.choices[0].text == "yard" * 4, r)
        r = acme.chat.completions.create(
            model="acme/support", max_tokens=3, temperature=0.8, top_p=0.9, seed=5, logit_bias={"277": 100},
            presence_penalty=0.5, frequency_penalty=0.5, messages=[{"role": "user", "content": "Tell me a story"}],
            extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2})
        expect(r.choices[0].message.content == "yard" * 3, r)

    @check("a completion's prompt may be token ids: the same answer as the text they encode")
    def _():
        # The test model's tokens of "The quick brown fox" (fixtures/golden/cases.json).
        ids = [54, 269, 372, 268, 355, 367]
        as_text = acme.completions.create(model=state["base"], prompt="The quick brown fox", max_tokens=8, temperature=0)
        as_ids = acme.completions.create(model=state["base"], prompt=ids, max_tokens=8, temperature=0)
        expect(as_ids.choices[0].text == as_text.choices[0].text, (as_ids, as_text))
        expect(as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens == len(ids), (as_ids.usage, as_text.usage))
        for bad, needle in (([], "a list of prompts"), ([1, 100000], "outside the vocabulary"),
                            ([[1], [2, 100000]], "outside the vocabulary")):
            try:
                acme.completions.create(model=state["base"], prompt=bad, max_tokens=2)
            except openai.BadRequestError as e:
                expect(needle in e.body["message"], (bad, e.body))
            else:
                raise AssertionError(f"prompt {bad} was accepted")

    @check("a logit bias for a token outside the vocabulary is a 400 naming logit_bias")
    def _():
        try:
            acme.completions.create(model=state["base"], prompt="Once", max_tokens=2, logit_bias={"100000": 1})
        except openai.BadRequestError as e:
            expect("logit_bias" in e.body["message"] and "vocabulary" in e.body["message"], e.body)
        else:
            raise AssertionError("an out-of-vocabulary logit_bias was accepted")

    @check("logprobs come back in the SDK's types: chat and completions, streamed and not")
    def _():
        ask = dict(model="acme/support", max_tokens=6, temperature=0,
                   messages=[{"role": "user", "content": "Tell me a story"}])
        r = acme.chat.completions.create(logprobs=True, top_logprobs=3, **ask)
        content = r.choices[0].logprobs.content
        expect(b"".join(bytes(t.bytes) for t in content).decode() == r.choices[0].message.content, content)
        for t in content:
            expect(t.logprob <= 0 and len(t.top_logprobs) == 3, t)
            # Greedy: the chosen token is the most likely one.
            expect(t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob, t)
            expect(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob, t)
        streamed = [t for chunk in acme.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **ask)
                    if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
        expect([(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content], streamed)
        plain = acme.chat.completions.create(**ask)
        expect(plain.choices[0].logprobs is None, plain)

        c = acme.completions.create(model=state["base"], prompt="Once upon a time", max_tokens=6, temperature=0,
                                    logprobs=2)
        lp = c.choices[0].logprobs
        # A token holding part of a UTF-8 character shows as U+FFFD; the others spell the text.
        joined = "".join(lp.tokens)
        expect(("\ufffd" in joined or joined == c.choices[0].text) and len(lp.token_logprobs) == len(lp.tokens), lp)
        expect(all(len(top) <= 2 and max(top.values()) == p for top, p in zip(lp.top_logprobs, lp.token_logprobs)), lp)
        expect(lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))], lp)
        streamed = [c for c in acme.completions.create(model=state["base"], prompt="Once upon a time", max_tokens=6,
                                                       temperature=0, logprobs=2, stream=True) if c.choices]
        tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
        expect(tokens == lp.tokens and offsets == lp.text_offset, (tokens, offsets))

    @check("n choices: indexed, each reproducible from its seed, streamed as not, the prompt counted once")
    def _():
        ask = dict(model="acme/support", max_tokens=6, temperature=1.0, seed=7, extra_body={"ignore_eos": True},
                   messages=[{"role": "user", "content": "Tell me a story"}])
        r = acme.chat.completions.create(n=3, **ask)
        texts = [c.message.content for c in r.choices]
        expect([c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) > 1, r.choices)
        expect([c.message.content for c in acme.chat.completions.create(n=3, **ask).choices] == texts,
               "the same seed gives the same choices")
        for i in range(3):
            one = acme.chat.completions.create(**{**ask, "seed": 7 + i})
            expect(one.choices[0].message.content == texts[i], (i, one.choices[0].message.content, texts[i]))
        expect(r.usage.completion_tokens == 3 * 6 and r.usage.prompt_tokens == one.usage.prompt_tokens, r.usage)
        streamed = {}
        for chunk in acme.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **ask):
            for c in chunk.choices:
                streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            if chunk.usage:
                expect(chunk.usage.completion_tokens == 18, chunk.usage)
        expect([streamed[i] for i in range(3)] == texts, (streamed, texts))
        c = acme.completions.create(model=state["base"], prompt="Once upon a time", max_tokens=4, temperature=0, n=2)
        expect(len(c.choices) == 2 and c.choices[0].text == c.choices[1].text, c.choices)
        try:
            acme.completions.create(model=state["base"], prompt="Once", max_tokens=2, n=17)
        except openai.BadRequestError as e:
            expect(e.body["param"] == "n", e.body)
        else:
            raise AssertionError("n=17 was accepted")

    @check("echo with prompt logprobs, as evaluation harnesses score a continuation; several prompts")
    def _():
        # The test model's tokens of "The quick brown fox" (fixtures/golden/cases.json).
        ids = [54, 269, 372, 268, 355, 367]
        ask = dict(model=state["base"], max_tokens=1, temperature=0, echo=True, logprobs=2)
        r = acme.completions.create(prompt="The quick brown fox", **ask)
        lp = r.choices[0].logprobs
        expect(r.choices[0].text.startswith("The quick brown fox"), r.choices[0])
        expect(len(lp.tokens) == len(ids) + 1 and "".join(lp.tokens) == r.choices[0].text, lp)
        expect(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp)
        expect(all(p is not None and p <= 0 for p in lp.token_logprobs[1:]), lp)
        # A prompt token's log-probability is the model's for that token after the ones before:
        # what a request for the prefix reports for that token when a bias forces it.
        forced = acme.completions.create(model=state["base"], prompt=ids[:3], max_tokens=1, temperature=0,
                                         logprobs=0, logit_bias={str(ids[3]): 100})
        expect(abs(forced.choices[0].logprobs.token_logprobs[0] - lp.token_logprobs[3]) < 1e-3,
               (forced.choices[0].logprobs, lp.token_logprobs))
        # Streamed, the same tokens and log-probabilities.
        chunks = [c for c in acme.completions.create(prompt="The quick brown fox", stream=True, **ask) if c.choices]
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        expect(tokens == lp.tokens and "".join(c.choices[0].text for c in chunks) == r.choices[0].text, chunks)
        # Token ids echo as their text, with or without log-probabilities.
        plain = acme.completions.create(model=state["base"], prompt=ids, max_tokens=2, temperature=0, echo=True)
        expect(plain.choices[0].text.startswith("The quick brown fox") and plain.choices[0].logprobs is None, plain)
        # Several prompts, n choices each: indexed prompt by prompt, each prompt counted once.
        many = acme.completions.create(model=state["base"], prompt=["Once upon a time", ids], max_tokens=3,
                                       temperature=0, n=2)
        expect([c.index for c in many.choices] == [0, 1, 2, 3], many.choices)
        one = acme.completions.create(model=state["base"], prompt="Once upon a time", max_tokens=3, temperature=0)
        two = acme.completions.create(model=state["base"], prompt=ids, max_tokens=3, temperature=0)
        texts = [c.text for c in many.choices]
        expect(texts == [one.choices[0].text] * 2 + [two.choices[0].text] * 2, (texts, one, two))
        expect(many.usage.prompt_tokens == one.usage.prompt_tokens + two.usage.prompt_tokens
               and many.usage.completion_tokens == 12, many.usage)

    @check("top_logprobs past 20 is a 400 naming it")
    def _():
        try:
            acme.chat.completions.create(model=state["base"], max_tokens=2, logprobs=True, top_logprobs=21,
                                         messages=[{"role": "user", "content": "hi"}])
        except openai.BadRequestError as e:
            expect(e.body["param"] == "top_logprobs", e.body)
        else:
            raise AssertionError("top_logprobs=21 was accepted")

    @check("the adapter changes the output (the request really ran with it)")
    def _():
        expect(state["completion:acme/support"] != state["completion:base"]
               or state["chat:acme/support"] != state["chat:base"],
               "adapter and base model generated the same text")

    @check("tenant beta cannot use acme's adapter (404 model_not_found)")
    def _():
        try:
            sdk(keys.mint("beta")).chat.completions.create(
                model="acme/support", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        except openai.NotFoundError as e:
            expect(e.body["code"] == "model_not_found", e.body)
        else:
            raise AssertionError("beta reached acme/support")

    now = int(time.time())
    good = {"iss": ISSUER, "aud": AUDIENCE, "tenant": "acme", "exp": now + 600}
    forged = {
        "alg none": unsigned({"alg": "none", "typ": "JWT"}, good) + ".",
        "HS256 signed with the RS256 public key (algorithm confusion)": None,
        "wrong aud": keys.mint("acme", aud="someone-else"),
        "wrong iss": keys.mint("acme", iss="https://evil.test"),
        "nbf in the future": keys.mint("acme", nbf=now + 3600),
        "expired": keys.mint("acme", exp=now - 3600),
        "signed with another key": jwt.encode(good, rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                              algorithm="RS256"),
        "no tenant claim": keys.mint("acme", tenant=None),
        "a tampered payload": None,
        "garbage": "not-a-token",
    }
    signing_input = unsigned({"alg": "HS256", "typ": "JWT"}, good)
    mac = hmac.new(keys.rs256_public, signing_input.encode(), hashlib.sha256).digest()
    forged["HS256 signed with the RS256 public key (algorithm confusion)"] = signing_input + "." + b64(mac)
    h, _, s = keys.mint("acme", alg="RS256").split(".")
    forged["a tampered payload"] = h + "." + b64(json.dumps({**good, "tenant": "beta"}).encode()) + "." + s

    for case, token in forged.items():
        @check(f"forged token refused with 401: {case}")
        def _(token=token):
            try:
                sdk(token).chat.completions.create(model=state["base"], max_tokens=2,
                                                   messages=[{"role": "user", "content": "hi"}])
            except openai.AuthenticationError as e:
                expect(e.status_code == 401 and e.body["type"] == "authentication_error", e.body)
            else:
                raise AssertionError("accepted")

    @check("admin calls need their scopes (403) and a token (401)")
    def _():
        reader = {"Authorization": "Bearer " + keys.mint("ops", "lora:read")}
        r = http.delete("/v1/loras/acme/support", headers=reader)
        expect(r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text)
        r = http.post("/v1/loras", json={"lora_name": "x", "source": {"uri": "s3://b/x"}})
        expect(r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text)

    @check("unload (a name with '/') removes the adapter from /v1/models")
    def _():
        r = http.delete("/v1/loras/acme/support", headers=admin)
        expect(r.status_code == 200 and r.json()["status"] == "success", r.text)
        expect("acme/support" not in [m.id for m in acme.models.list().data], "still listed")
        r = http.delete("/v1/loras/acme/support", headers=admin)
        expect(r.status_code == 404 and "not found" in r.json()["error"]["message"], r.text)

    for name, fn in CHECKS:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report which check failed, then fail
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            sys.exit(1)
        print(f"ok   {name}", flush=True)
    print(f"{len(CHECKS)} checks passed", flush=True)


def main(argv):
    if len(argv) == 3 and argv[1] == "keys":
        write_keys(Path(argv[2]))
    elif len(argv) == 5 and argv[1] == "run":
        run(argv[2].rstrip("/"), Keys(Path(argv[3])), Path(argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
