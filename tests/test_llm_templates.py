"""LLM-written prompt sentences: prompt, skeleton, validation, and the client against a local fake endpoint."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coft_fast.cli import main, run
from coft_fast.pseudo import TemplateError, class_prompts
from coft_fast.pseudo.llm_templates import (
    ask_llm,
    chat_completions_url,
    llm_prompt,
)
from coft_fast.pseudo.templates import validate_class_sentences
from coft_fast.runtime.io import atomic_write_json

NAMES = ["sea lion", "golden retriever", "Boeing 737"]
SENTENCES = {
    "sea lion": ["a photo of a sea lion, a sleek brown marine mammal.", "a sea lion resting on rocks."],
    "golden retriever": ["a photo of a golden retriever, a type of dog.", "a golden retriever with a golden coat."],
    "Boeing 737": ["a photo of a Boeing 737, a type of aircraft.", "a Boeing 737 with twin engines."],
}


def completion(content, finish_reason="stop"):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason}]}


class FakeEndpoint:
    """A local OpenAI-style /v1/chat/completions server; set ``status`` and ``reply``, read ``requests``."""

    def __init__(self):
        self.status, self.reply, self.requests = 200, completion("{}"), []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                if self.path != "/v1/chat/completions":
                    status, payload = 404, b'{"error": "not found"}'
                else:
                    reply = endpoint.reply
                    status = endpoint.status
                    payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def llm():
    endpoint = FakeEndpoint()
    yield endpoint
    endpoint.close()


def test_prompt_asks_for_exact_names_json_and_short_sentences():
    text = llm_prompt(NAMES, per_class=7, dataset_hint="animals and aircraft")
    assert json.dumps(NAMES) in text and "7" in text and "animals and aircraft" in text
    assert "JSON" in text and "77 tokens" in text and "visual" in text
    with pytest.raises(ValueError, match="at least 1"):
        llm_prompt(NAMES, per_class=0)


def test_endpoint_url():
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_valid_fenced_reply_is_written_and_loads(llm, tmp_path):
    llm.reply = completion("Here you go:\n```json\n" + json.dumps(SENTENCES, indent=1) + "\n```\n")
    got = ask_llm(llm.url, "tiny-model", NAMES, per_class=2, dataset_hint="mixed things")
    assert got == SENTENCES and list(got) == NAMES
    request = llm.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "tiny-model" and request["body"]["temperature"] == 0
    roles = [m["role"] for m in request["body"]["messages"]]
    assert roles == ["system", "user"]
    assert all(name in request["body"]["messages"][1]["content"] for name in NAMES)
    assert "Authorization" not in request["headers"]

    ask_llm(llm.url + "/chat/completions", "tiny-model", NAMES, api_key="sk-test")
    assert llm.requests[-1]["path"] == "/v1/chat/completions"
    assert llm.requests[-1]["headers"]["Authorization"] == "Bearer sk-test"

    path = tmp_path / "t.json"
    atomic_write_json(path, got)
    assert class_prompts(path, NAMES) == [SENTENCES[name] for name in NAMES]


def test_reply_missing_a_class(llm):
    llm.reply = completion(json.dumps({k: v for k, v in SENTENCES.items() if k != "golden retriever"}))
    with pytest.raises(TemplateError, match=r"127\.0\.0\.1.*class 'golden retriever' needs"):
        ask_llm(llm.url, "m", NAMES)


def test_reply_with_a_misspelt_class_lists_both(llm):
    data = dict(SENTENCES)
    data["golden-retriever"] = data.pop("golden retriever")
    llm.reply = completion(json.dumps(data))
    with pytest.raises(TemplateError, match="missing classes: 'golden retriever'.*'golden-retriever' are not class"):
        ask_llm(llm.url, "m", NAMES)


def test_answer_that_is_not_json(llm):
    llm.reply = completion("Sure! Sea lions are marine mammals that ...")
    with pytest.raises(TemplateError, match="answer is not JSON.*Sea lions"):
        ask_llm(llm.url, "m", NAMES)
    llm.reply = completion('{"sea lion": ["a', finish_reason="length")
    with pytest.raises(TemplateError, match="cut off"):
        ask_llm(llm.url, "m", NAMES)


def test_reply_that_is_not_a_chat_completion(llm):
    llm.reply = b"<html>proxy error</html>"
    with pytest.raises(TemplateError, match="reply is not JSON.*proxy error"):
        ask_llm(llm.url, "m", NAMES)
    llm.reply = {"result": "ok"}
    with pytest.raises(TemplateError, match=r"no choices\[0\]\.message\.content"):
        ask_llm(llm.url, "m", NAMES)


def test_http_error_names_status_and_body(llm):
    llm.status, llm.reply = 500, {"error": {"message": "model overloaded"}}
    with pytest.raises(TemplateError, match=r"/v1/chat/completions: HTTP 500.*model overloaded"):
        ask_llm(llm.url, "m", NAMES)
    llm.status = 200
    with pytest.raises(TemplateError, match="HTTP 404"):
        ask_llm(llm.url.replace("/v1", "/v2"), "m", NAMES)


def test_connection_refused_names_the_url():
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens on this port now
    with pytest.raises(TemplateError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: cannot connect"):
        ask_llm(f"http://127.0.0.1:{port}/v1", "m", NAMES, timeout=5)


@pytest.mark.parametrize(
    "data, message",
    [
        ([["x"]], "expected a mapping"),
        ({"sea lion": ["x"], "golden retriever": ["x"]}, "class 'Boeing 737' needs"),
        ({**SENTENCES, "horse": ["x"]}, "'horse' are not class names"),
        ({**SENTENCES, "sea lion": []}, "class 'sea lion' needs a non-empty list"),
        ({**SENTENCES, "sea lion": "a sea lion."}, "class 'sea lion' needs .* got str"),
        ({**SENTENCES, "sea lion": ["ok", 3]}, "entry 2 is 3"),
        ({**SENTENCES, "sea lion": ["ok", "  "]}, "entry 2 is '  '"),
    ],
)
def test_validation_errors_name_origin_and_class(data, message):
    with pytest.raises(TemplateError, match=f"^answer.json: .*{message}"):
        validate_class_sentences(data, NAMES, "answer.json")


def test_cli_without_llm_writes_prompt_and_skeleton(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n\n")
    out = tmp_path / "templates.json"
    assert run(["templates", "--classes", str(classes), "--out", str(out), "--per-class", "5",
                "--dataset-hint", "mixed"]) == 0
    printed = capsys.readouterr().out
    prompt = tmp_path / "templates.prompt.txt"
    assert str(prompt) in printed and str(out) in printed and "--templates" in printed
    assert json.loads(out.read_text()) == {name: [] for name in NAMES}
    assert json.dumps(NAMES) in prompt.read_text() and "5 short" in prompt.read_text()
    # an unfilled skeleton is refused, naming the file and the first empty class
    with pytest.raises(TemplateError, match=rf"{out.name}: class 'sea lion' needs a non-empty list"):
        class_prompts(out, NAMES)
    with pytest.raises(ValueError, match="exists; use --force"):
        run(["templates", "--classes", str(classes), "--out", str(out)])
    assert run(["templates", "--classes", str(classes), "--out", str(out), "--force"]) == 0


def test_cli_with_llm_url(llm, tmp_path, capsys, monkeypatch):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    out = tmp_path / "llm.json"
    llm.reply = completion("```json\n" + json.dumps(SENTENCES) + "\n```")
    monkeypatch.setenv("MY_KEY", "sk-cli")
    assert run(["templates", "--classes", str(classes), "--out", str(out), "--per-class", "2",
                "--llm-url", llm.url, "--llm-model", "tiny", "--api-key-env", "MY_KEY"]) == 0
    assert "2 sentences per class" in capsys.readouterr().out
    assert llm.requests[-1]["headers"]["Authorization"] == "Bearer sk-cli"
    assert (tmp_path / "llm.prompt.txt").is_file()
    assert class_prompts(out, NAMES) == [SENTENCES[name] for name in NAMES]

    llm.reply = completion(json.dumps({"sea lion": ["x"]}))
    with pytest.raises(TemplateError, match="class 'golden retriever' needs"):
        run(["templates", "--classes", str(classes), "--out", str(tmp_path / "bad.json"),
             "--llm-url", llm.url, "--llm-model", "tiny"])
    assert not (tmp_path / "bad.json").exists()


def test_cli_llm_url_needs_model(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="--llm-url and --llm-model go together"):
        run(["templates", "--classes", str(classes), "--out", str(tmp_path / "t.json"), "--llm-url", "http://x/v1"])
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(SystemExit) as exited:
        main(["templates", "--classes", str(classes), "--out", str(tmp_path / "t.json"), "--llm-model", "m"])
    assert exited.value.code == 2
    assert "coft-fast: error: --llm-url and --llm-model go together" in capsys.readouterr().err
