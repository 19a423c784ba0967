"""Checks that the official `openai` SDK handles Switchyard's quota refusals as it handles
OpenAI's: with its default retries it waits as `retry-after-ms` says and succeeds; without them
it raises `RateLimitError`, whose response carries the `x-ratelimit-*` headers.

    quota_client.py BASE_URL ACME_TOKEN CAPPED_TOKEN FAULTS_FILE

`acme` may have one request in flight (`concurrent_requests = 1`), `capped` may send one request
a minute. FAULTS_FILE is the backend's fault-injection file: "stall" wedges its engine, which
keeps acme's one request in flight for as long as the script wants.

Exits non-zero, naming the check, on the first failure.
"""

import sys
import threading
import time
from pathlib import Path

import openai

MESSAGES = [{"role": "user", "content": "Hello!"}]


def check(ok, what):
    if not ok:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def main():
    base, acme, capped, faults = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    url = base + "/v1"

    # acme's one place is taken by a request the wedged engine holds.
    faults.write_text("stall")
    holder = openai.OpenAI(base_url=url, api_key=acme, max_retries=0)
    held = {}
    first = threading.Thread(
        target=lambda: held.update(r=holder.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=4))
    )
    first.start()
    time.sleep(0.5)
    # The engine is released half a second later; the SDK's retry, a second after the 429,
    # finds the place free.
    threading.Timer(0.5, lambda: faults.write_text("")).start()
    client = openai.OpenAI(base_url=url, api_key=acme)  # the SDK's default retries
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="tiny-llama", messages=MESSAGES, max_tokens=4)
    waited = time.monotonic() - started
    first.join()
    check("r" in held, "the request that held the place finished")
    check(raw.retries_taken >= 1, f"the SDK retried after the 429 ({raw.retries_taken} retries)")
    check(waited >= 0.9, f"it waited as retry-after-ms said ({waited:.2f} s)")
    completion = raw.parse()
    check(completion.choices[0].message.content is not None, "the retry was answered")

    # Without retries: the minute's one request, then RateLimitError with the headers.
    once = openai.OpenAI(base_url=url, api_key=capped, max_retries=0)
    once.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=4)
    try:
        once.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=4)
        check(False, "a second request in the minute is refused")
    except openai.RateLimitError as e:
        check(e.status_code == 429, "429")
        check(e.code == "rate_limit_exceeded", f"code {e.code}")
        h = e.response.headers
        check(h.get("x-ratelimit-limit-requests") == "1", "x-ratelimit-limit-requests")
        check(h.get("x-ratelimit-remaining-requests") == "0", "x-ratelimit-remaining-requests")
        check(h.get("x-ratelimit-reset-requests", "").endswith("s"), "x-ratelimit-reset-requests")
        check(1 <= int(h.get("retry-after", "0")) <= 60, f"retry-after {h.get('retry-after')}")
    print("checks passed")


if __name__ == "__main__":
    main()
