#!/usr/bin/env python3
"""The official `openai` Python package through the example proxy, unchanged.

Starts the mock upstream (`src/bin/mock_upstream.rs`) and the example proxy (`src/main.rs`)
of the `example-proxy` package as subprocesses on loopback ports, with a temporary configuration,
and drives the proxy with `openai.OpenAI(base_url=..., api_key=<virtual key>)`:

* allowed calls work as against OpenAI (chat, a dated snapshot, streaming, the model list
  filtered to the key's models, embeddings);
* every rejection raises the SDK's usual typed exception (`AuthenticationError`,
  `PermissionDeniedError`, `UnprocessableEntityError`, `BadRequestError`, ...) with the
  status, the `code`, and an error body carrying message/type/param/code;
* after a graceful shutdown (SIGTERM), the audit JSONL file has one line per request, the
  rejected ones with `blocked_by`, and no line holds a key.

Plain `unittest`, so only `openai` needs installing:

    pip install openai
    cargo build -p example-proxy --bins
    python3 examples/proxy/tests/python/test_openai_sdk.py -v

Environment: PROXY_BIN and MOCK_BIN (default: target/debug/{proxy,mock_upstream} of this
repository, or of $CARGO_TARGET_DIR), SDK_TEST_TIMEOUT (seconds for the whole script,
default 60). Run by `tests/python_sdk.rs` during `cargo test -p example-proxy`, with the
binaries cargo built for it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request
from pathlib import Path

import openai

# examples/proxy/tests/python/ -> the repository (the workspace root).
REPO = Path(__file__).resolve().parents[4]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
PROXY_BIN = os.environ.get("PROXY_BIN") or str(TARGET / "debug/proxy")
MOCK_BIN = os.environ.get("MOCK_BIN") or str(TARGET / "debug/mock_upstream")
TIMEOUT = int(os.environ.get("SDK_TEST_TIMEOUT", "60"))

PROVIDER_ENV = "PY_SDK_TEST_PROVIDER_KEY"
PROVIDER_KEY = "sk-provider-py-sdk-0123456789"
CHAT_KEY = "sk-py-chat-app-key-0001"  # gpt-4o-mini, gpt-4o; no images; 1000 prompt tokens
SHORT_KEY = "sk-py-short-prompts-key-0002"  # gpt-4o-mini; 200 prompt characters
NO_MODELS_KEY = "sk-py-no-models-key-0003"  # an empty model list
OPEN_KEY = "sk-py-open-key-0004"  # any model; images blocked
EXPIRED_KEY = "sk-py-expired-key-0005"  # expired in 2020
UNKNOWN_KEY = "sk-py-unknown-key-0006"  # not in the configuration
ALL_KEYS = [CHAT_KEY, SHORT_KEY, NO_MODELS_KEY, OPEN_KEY, EXPIRED_KEY, UNKNOWN_KEY]
# The names the audit records carry instead of the keys.
KEY_NAMES = {
    CHAT_KEY: "chat-app",
    SHORT_KEY: "short-prompts",
    NO_MODELS_KEY: "no-models",
    OPEN_KEY: "open",
    EXPIRED_KEY: "expired",
}

# The mock's answer (8 words by default) and the chat-app key's models.
ANSWER = "This is a mock response from the upstream"
CHAT_MODELS = ["gpt-4o", "gpt-4o-mini"]
BODY_LIMIT = 64 * 1024
# A word the `banned-words` guard blocks in prompts, and one the `answer-stop` guard blocks in
# answers (the mock answers `ECHO <text>` with <text>, streamed 4 characters at a time).
BANNED_WORD = "xyzzy"
STREAM_STOP_WORD = "plugh"


def config_text(upstream: str, audit: Path) -> str:
    return f"""listen = "127.0.0.1:0"

[upstream]
base_url = "{upstream}"
api_key_env = "{PROVIDER_ENV}"
connect_timeout = "5s"
first_byte_timeout = "10s"
idle_timeout = "10s"

[server]
shutdown_grace = "5s"

[audit]
jsonl = {json.dumps(str(audit))}

[body]
limit = {BODY_LIMIT}

# Content guards: a word blocked in prompts, and one that stops an answer mid-stream.
[[guards]]
name = "banned-words"
kind = "words"
words = ["{BANNED_WORD}"]

[[guards]]
name = "answer-stop"
kind = "words"
on = ["response"]
words = ["{STREAM_STOP_WORD}"]

[[keys]]
name = "chat-app"
secret = "{CHAT_KEY}"
model_limits_enabled = true
model_limits = ["gpt-4o-mini", "gpt-4o"]
blocked_features = ["images", "audio"]
max_prompt_tokens = 1000

[[keys]]
name = "short-prompts"
secret = "{SHORT_KEY}"
model_limits_enabled = true
model_limits = ["gpt-4o-mini"]
max_prompt_chars = 200

[[keys]]
name = "no-models"
secret = "{NO_MODELS_KEY}"
model_limits_enabled = true
model_limits = []

[[keys]]
name = "open"
secret = "{OPEN_KEY}"
blocked_features = ["images"]

[[keys]]
name = "expired"
secret = "{EXPIRED_KEY}"
expires_at = "2020-01-01T00:00:00Z"
"""


# ---------------------------------------------------------------------------------------------
# Subprocesses

PROCESSES = []  # every child started, killed on any exit path


def kill_all():
    for proc in PROCESSES:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def watchdog(_signum, _frame):
    sys.stderr.write(f"\nFAIL: the script ran for more than {TIMEOUT}s; stopping\n")
    kill_all()
    Harness.dump_logs()
    sys.stderr.flush()
    os._exit(3)


def die_with_parent():
    """In the child, on Linux: SIGKILL when this script dies, even by SIGKILL."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def spawn(args, log_path: Path, env=None) -> subprocess.Popen:
    """Starts `args` with stdout and stderr in `log_path` (a file: no pipe to drain)."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
    )
    log.close()
    PROCESSES.append(proc)
    return proc


def wait_for_line(proc: subprocess.Popen, log_path: Path, pattern: str, what: str) -> re.Match:
    """Waits (10 s at most) until `log_path` has a line matching `pattern`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = re.search(pattern, text)
        if match:
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{text}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within 10s:\n{log_path.read_text(errors='replace')}")


def wait_healthy(url: str):
    deadline = time.monotonic() + 10
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200 and json.load(response) == {"status": "ok"}:
                    return
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within 10s (last error: {last})")


class Harness:
    """The mock and the proxy, shared by every test (started once, in `setUpClass`)."""

    dir = None
    mock = None
    proxy = None
    mock_log = None
    proxy_log = None
    audit_path = None
    base_url = None
    # Every request sent through the proxy, for the audit check: dicts with method, path,
    # model, status, rejected (by a policy layer) and audited (goes through the stack).
    sent = []

    @classmethod
    def start(cls):
        for binary in (PROXY_BIN, MOCK_BIN):
            if not os.access(binary, os.X_OK):
                raise RuntimeError(
                    f"{binary} is missing: run `cargo build -p example-proxy --bins` "
                    "(or set PROXY_BIN / MOCK_BIN)"
                )
        cls.dir = tempfile.TemporaryDirectory(prefix="py-sdk-proxy-")
        root = Path(cls.dir.name)
        cls.mock_log = root / "mock.log"
        cls.proxy_log = root / "proxy.log"
        cls.audit_path = root / "audit.jsonl"

        cls.mock = spawn([MOCK_BIN, "--listen", "127.0.0.1:0"], cls.mock_log)
        match = wait_for_line(
            cls.mock, cls.mock_log, r"listening on (http://127\.0\.0\.1:\d+/v1)", "the mock"
        )
        upstream = match.group(1)

        config = root / "proxy.toml"
        config.write_text(config_text(upstream, cls.audit_path))
        env = dict(os.environ)
        env[PROVIDER_ENV] = PROVIDER_KEY
        env.setdefault("RUST_LOG", "info")
        env.pop("OPENAI_API_KEY", None)
        cls.proxy = spawn(
            [PROXY_BIN, "--config", str(config), "--listen", "127.0.0.1:0"], cls.proxy_log, env
        )
        match = wait_for_line(
            cls.proxy, cls.proxy_log, r"listening on http://(127\.0\.0\.1:\d+)/v1", "the proxy"
        )
        addr = match.group(1)
        wait_healthy(f"http://{addr}/healthz")
        cls.base_url = f"http://{addr}/v1"

    @classmethod
    def stop_proxy(cls) -> int:
        """SIGTERM, then waits for the graceful shutdown (which flushes the audit sink)."""
        if cls.proxy is None:
            raise RuntimeError("the proxy was not started")
        if cls.proxy.poll() is None:
            cls.proxy.send_signal(signal.SIGTERM)
        return cls.proxy.wait(timeout=15)

    @classmethod
    def dump_logs(cls):
        for name, path in (("proxy", cls.proxy_log), ("mock", cls.mock_log)):
            if path is not None and path.exists():
                sys.stderr.write(f"\n----- {name} output -----\n")
                sys.stderr.write(path.read_text(errors="replace")[-20000:])
        sys.stderr.write("\n")

    @classmethod
    def client(cls, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=cls.base_url, api_key=key, max_retries=0, timeout=10)


def call(
    fn, *, key, method, path, model=None, stream=False, rejected=False, audited=True, body_read=True
):
    """Runs one SDK call and notes the request for the audit check (whatever happens).
    `body_read=False`: the proxy refuses it from its path alone, so the record has no model."""
    entry = {
        "body_read": body_read,
        "key": key,
        "method": method,
        "path": path,
        "model": model,
        "stream": stream,
        "status": None,
        "rejected": rejected,
        "audited": audited,
    }
    Harness.sent.append(entry)
    try:
        result = fn()
        entry["status"] = 200
        return result
    except openai.APIStatusError as e:
        entry["status"] = e.status_code
        raise


# ---------------------------------------------------------------------------------------------
# The tests. unittest runs them in name order: `test_z_audit...` last, as it stops the proxy.


class OpenAISdkThroughProxy(unittest.TestCase):
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        try:
            Harness.start()
        except BaseException:
            kill_all()
            Harness.dump_logs()
            raise

    @classmethod
    def tearDownClass(cls):
        kill_all()
        failed = getattr(cls, "_failed", False)
        if failed:
            Harness.dump_logs()
        if Harness.dir is not None:
            Harness.dir.cleanup()

    def run(self, result=None):
        result = super().run(result)
        if result is not None and not result.wasSuccessful():
            type(self)._failed = True
        return result

    # --- helpers ---

    def assert_error(self, ctx, exc_type, status, code, message=None):
        """The SDK raised `exc_type` with `status`, `code` and a full OpenAI error body."""
        e = ctx.exception
        self.assertIs(type(e), exc_type, f"{type(e).__name__}: {e}")
        self.assertEqual(e.status_code, status)
        self.assertEqual(e.code, code)
        self.assertIsInstance(e.body, dict, repr(e.body))
        for key in ("message", "type", "param", "code"):
            self.assertIn(key, e.body, f"`{key}` missing in {e.body}")
        error = e.response.json()["error"]
        self.assertEqual(sorted(error), ["code", "message", "param", "type"], error)
        self.assertEqual(error["code"], code)
        self.assertIsInstance(error["message"], str)
        self.assertTrue(error["message"])
        self.assertEqual(e.response.headers["content-type"], "application/json")
        for secret in ALL_KEYS + [PROVIDER_KEY]:
            self.assertNotIn(secret, e.response.text)
        if message is not None:
            self.assertEqual(error["message"], message)
            self.assertEqual(e.message.split(" - ")[0].strip(), f"Error code: {status}")
        return e

    def chat(self, key, model, text, rejected=False):
        """One user message to `model` with `key`."""
        return call(
            lambda: Harness.client(key).chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}]
            ),
            key=key,
            method="POST",
            path="/v1/chat/completions",
            model=model,
            rejected=rejected,
        )

    def rejected_chat(self, key, model, text):
        return self.chat(key, model, text, rejected=True)

    # --- allowed ---

    def test_chat_completion_is_allowed(self):
        response = self.chat(CHAT_KEY, "gpt-4o-mini", "hello through the proxy")
        self.assertEqual(response.model, "gpt-4o-mini")
        self.assertEqual(response.object, "chat.completion")
        self.assertEqual(response.choices[0].message.content, ANSWER)
        self.assertEqual(response.choices[0].finish_reason, "stop")
        self.assertIsNotNone(response.usage)
        self.assertEqual(response.usage.prompt_tokens, 4)
        self.assertEqual(response.usage.completion_tokens, 8)
        self.assertEqual(response.usage.total_tokens, 12)

    def test_dated_snapshot_is_allowed(self):
        response = self.chat(CHAT_KEY, "gpt-4o-2024-08-06", "hello")
        self.assertEqual(response.model, "gpt-4o-2024-08-06")
        self.assertEqual(response.choices[0].message.content, ANSWER)

    def test_streaming_chat(self):
        def run():
            stream = Harness.client(CHAT_KEY).chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "stream this please"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            return chunks

        chunks = call(
            run,
            key=CHAT_KEY,
            method="POST",
            path="/v1/chat/completions",
            model="gpt-4o-mini",
            stream=True,
        )
        self.assertGreaterEqual(len(chunks), 10, chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, ANSWER)
        for chunk in chunks:
            self.assertEqual(chunk.object, "chat.completion.chunk")
            self.assertEqual(chunk.model, "gpt-4o-mini")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        self.assertEqual(finishes[-1], "stop")
        usage = chunks[-1].usage
        self.assertIsNotNone(usage, "no usage chunk at the end of the stream")
        self.assertEqual(usage.prompt_tokens, 3)
        self.assertEqual(usage.completion_tokens, 8)

    def test_streaming_chat_without_usage(self):
        # Without `stream_options` the client gets no usage chunk (a proxy that turns usage
        # on upstream for its audit must take that chunk out again).
        def run():
            stream = Harness.client(OPEN_KEY).chat.completions.create(
                model="gpt-4.1",
                messages=[{"role": "user", "content": "stream without usage"}],
                stream=True,
            )
            with stream:
                return list(stream)

        chunks = call(
            run,
            key=OPEN_KEY,
            method="POST",
            path="/v1/chat/completions",
            model="gpt-4.1",
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, ANSWER)
        for chunk in chunks:
            self.assertTrue(chunk.choices, f"a chunk without choices: {chunk}")
            self.assertIsNone(chunk.usage, f"a usage chunk the client did not ask for: {chunk}")

    def test_models_list_is_filtered_to_the_keys_models(self):
        page = call(
            lambda: Harness.client(CHAT_KEY).models.list(),
            key=CHAT_KEY,
            method="GET", path="/v1/models"
        )
        ids = sorted(m.id for m in page)
        self.assertEqual(ids, CHAT_MODELS)
        for model in page:
            self.assertEqual(model.object, "model")

        # A key without a model list sees the upstream's whole list.
        everything = call(
            lambda: Harness.client(OPEN_KEY).models.list(),
            key=OPEN_KEY,
            method="GET", path="/v1/models"
        )
        ids = {m.id for m in everything}
        self.assertTrue(set(CHAT_MODELS) < ids, ids)
        self.assertIn("text-embedding-3-small", ids)

    def test_embeddings(self):
        # The SDK's defaults (it asks for base64 and decodes what it gets).
        response = call(
            lambda: Harness.client(OPEN_KEY).embeddings.create(
                model="text-embedding-3-small", input=["first text", "the second text"]
            ),
            key=OPEN_KEY,
            method="POST",
            path="/v1/embeddings",
            model="text-embedding-3-small",
        )
        self.assertEqual(response.model, "text-embedding-3-small")
        self.assertEqual(len(response.data), 2)
        for i, item in enumerate(response.data):
            self.assertEqual(item.index, i)
            self.assertGreater(len(item.embedding), 0)
            self.assertTrue(all(isinstance(x, float) for x in item.embedding))
        self.assertEqual(response.usage.prompt_tokens, 5)

    # --- rejected: KeyAuth ---

    def test_unknown_key_is_authentication_error(self):
        with self.assertRaises(openai.AuthenticationError) as ctx:
            self.rejected_chat(UNKNOWN_KEY, "gpt-4o-mini", "hello")
        self.assert_error(
            ctx, openai.AuthenticationError, 401, "invalid_api_key", "Incorrect API key provided."
        )

    def test_expired_key_is_authentication_error(self):
        with self.assertRaises(openai.AuthenticationError) as ctx:
            self.rejected_chat(EXPIRED_KEY, "gpt-4o-mini", "hello")
        self.assert_error(
            ctx, openai.AuthenticationError, 401, "key_expired", "This API key has expired."
        )

    # --- rejected: ModelAllowList ---

    def test_model_not_allowed_is_permission_denied(self):
        with self.assertRaises(openai.PermissionDeniedError) as ctx:
            self.rejected_chat(CHAT_KEY, "gpt-4.1", "hello")
        e = self.assert_error(
            ctx,
            openai.PermissionDeniedError,
            403,
            "model_not_allowed",
            "This key is not allowed to use model: gpt-4.1",
        )
        self.assertEqual(e.param, "model")
        self.assertEqual(e.type, "invalid_request_error")

    def test_key_with_no_models_is_permission_denied(self):
        with self.assertRaises(openai.PermissionDeniedError) as ctx:
            self.rejected_chat(NO_MODELS_KEY, "gpt-4o-mini", "hello")
        self.assert_error(
            ctx,
            openai.PermissionDeniedError,
            403,
            "model_not_allowed",
            "This key has no access to any models",
        )

    # --- rejected: FeatureBlock ---

    def test_blocked_feature_is_unprocessable_entity(self):
        # `open` has no model list: the model passes, the feature block decides.
        with self.assertRaises(openai.UnprocessableEntityError) as ctx:
            call(
                lambda: Harness.client(OPEN_KEY).images.generate(
                    model="dall-e-3", prompt="a lighthouse at dusk"
                ),
                key=OPEN_KEY,
                method="POST",
                path="/v1/images/generations",
                model="dall-e-3",
                rejected=True,
                body_read=False,
            )
        self.assert_error(ctx, openai.UnprocessableEntityError, 422, "feature_blocked")

    # --- rejected: PromptLimit ---

    def test_prompt_over_max_prompt_tokens_is_bad_request(self):
        # chat-app allows 1000 prompt tokens; this is about 3000.
        with self.assertRaises(openai.BadRequestError) as ctx:
            self.rejected_chat(CHAT_KEY, "gpt-4o-mini", "lorem ipsum dolor " * 1000)
        self.assert_error(ctx, openai.BadRequestError, 400, "prompt_too_long")

    def test_prompt_over_max_prompt_chars_is_bad_request(self):
        # short-prompts allows 200 characters; under it, the same key passes.
        response = self.chat(SHORT_KEY, "gpt-4o-mini", "short enough")
        self.assertEqual(response.choices[0].message.content, ANSWER)
        with self.assertRaises(openai.BadRequestError) as ctx:
            self.rejected_chat(SHORT_KEY, "gpt-4o-mini", "x" * 500)
        self.assert_error(ctx, openai.BadRequestError, 400, "prompt_too_long")

    # --- rejected: content guards ---

    def test_blocked_prompt_is_bad_request_content_blocked(self):
        with self.assertRaises(openai.BadRequestError) as ctx:
            self.rejected_chat(CHAT_KEY, "gpt-4o-mini", f"tell me about {BANNED_WORD}")
        e = self.assert_error(ctx, openai.BadRequestError, 400, "content_blocked")
        self.assertIn("`banned-words`", e.response.json()["error"]["message"])

    def test_stream_blocked_midway_raises_api_error(self):
        # The answer's first words reach the client; the guard then ends the stream with an
        # error event, which the SDK raises as APIError.
        received = []

        def run():
            stream = Harness.client(CHAT_KEY).chat.completions.create(
                model="gpt-4o-mini",
                messages=[
                    {
                        "role": "user",
                        "content": f"ECHO a perfectly harmless beginning, then {STREAM_STOP_WORD} and more",
                    }
                ],
                stream=True,
            )
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        received.append(chunk.choices[0].delta.content)

        entry = {
            "body_read": True,
            "key": CHAT_KEY,
            "method": "POST",
            "path": "/v1/chat/completions",
            "model": "gpt-4o-mini",
            "stream": True,
            # The response started (200); the guard that stopped it is the record's
            # `blocked_by`.
            "status": 200,
            "rejected": True,
            "audited": True,
        }
        Harness.sent.append(entry)
        with self.assertRaises(openai.APIError) as ctx:
            run()
        self.assertNotIsInstance(ctx.exception, openai.APIStatusError)
        self.assertIn("answer-stop", str(ctx.exception))
        text = "".join(received)
        self.assertTrue(text.startswith("a perfectly"), text)
        self.assertNotIn(STREAM_STOP_WORD, text)

    # --- rejected: the body limit, refused before the body or the key is read (so the
    # --- audit record has neither a key name nor a model, but it is there) ---

    def test_body_over_the_limit_is_413(self):
        with self.assertRaises(openai.APIStatusError) as ctx:
            call(
                lambda: Harness.client(CHAT_KEY).chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "y " * BODY_LIMIT}],
                ),
                key=None,
                method="POST",
                path="/v1/chat/completions",
                model=None,
                rejected=True,
            )
        self.assert_error(ctx, openai.APIStatusError, 413, "request_too_large")

    # --- the audit file, after a graceful shutdown (last: it stops the proxy) ---

    def test_z_audit_file_has_a_line_per_request(self):
        sent = [s for s in Harness.sent if s["audited"] and s["status"] is not None]
        self.assertTrue(sent, "no request was sent")
        code = Harness.stop_proxy()
        self.assertEqual(code, 0, "the proxy did not exit cleanly on SIGTERM")
        self.assertTrue(
            Harness.audit_path.exists(), f"no audit file at {Harness.audit_path} after shutdown"
        )
        text = Harness.audit_path.read_text()
        for secret in ALL_KEYS + [PROVIDER_KEY]:
            self.assertNotIn(secret, text, "a key is in the audit file")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]

        def summary(key, method, path, model, stream, status, rejected):
            return (key or "", method, path, model or "", bool(stream), status, bool(rejected))

        # An unknown key has no name; the others are named, rejected or not. A request refused
        # for its key has nothing of its body read: no model, no stream.
        read = lambda s: s["body_read"] and s["status"] != 401  # noqa: E731
        expected = sorted(
            summary(
                KEY_NAMES.get(s["key"]),
                s["method"],
                s["path"],
                s["model"] if read(s) else None,
                s["stream"] if read(s) else False,
                s["status"],
                s["rejected"],
            )
            for s in sent
        )
        got = sorted(
            summary(
                r.get("key"),
                r.get("method"),
                r.get("path"),
                r.get("model"),
                r.get("stream"),
                r.get("status"),
                r.get("blocked_by"),
            )
            for r in records
        )
        self.assertEqual(got, expected, f"audit file:\n{text}")
        for record in records:
            for field in ("key", "model", "status", "blocked_by", "code", "outcome", "stream"):
                self.assertIn(field, record, record)
            if record["status"] >= 400:
                self.assertTrue(record["blocked_by"], record)
                self.assertTrue(record["code"], record)
                self.assertEqual(record["outcome"], "rejected", record)
            elif "guard:answer-stop" in record["flags"]:
                # A stream a response guard stopped mid-way: it started as a 200, and the
                # record says the guard stopped it (not an upstream error).
                self.assertEqual(record["blocked_by"], "guard", record)
                self.assertEqual(record["code"], "content_blocked", record)
                self.assertTrue(record["stream"], record)
                self.assertEqual(record["outcome"], "stopped", record)
                self.assertIn("blocked", record["flags"], record)
                self.assertNotIn("upstream_error_body", record["flags"], record)
            else:
                self.assertIsNone(record["blocked_by"], record)
                self.assertEqual(record["outcome"], "completed", record)
            if record["code"] == "invalid_api_key":
                self.assertIsNone(record["key"], record)


def terminated(_signum, _frame):
    kill_all()
    sys.exit(143)


if __name__ == "__main__":
    signal.signal(signal.SIGALRM, watchdog)
    signal.signal(signal.SIGTERM, terminated)
    signal.alarm(TIMEOUT)
    try:
        unittest.main(verbosity=2)
    finally:
        signal.alarm(0)
        kill_all()
