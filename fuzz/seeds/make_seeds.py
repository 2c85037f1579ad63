#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (realistic OpenAI request bodies and
SSE streams, with the header bytes each target expects). Run from fuzz/: python3 seeds/make_seeds.py"""
import hashlib, json, os, struct

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
         "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
         "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations",
         "/v1/realtime/sessions", "/v1/realtime/client_secrets"]
P = {p: i for i, p in enumerate(PATHS)}
P["azure"] = 15
P["realtime_q"] = 13

def put(target, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    open(os.path.join(d, name), "wb").write(data)

def j(o):
    return json.dumps(o).encode()

chat = {"model": "gpt-4o-mini", "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "name": "alice", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny \u00e9t\u00e9 \"quoted\""}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    "stream": True, "stream_options": {"include_usage": False}, "max_tokens": 4096,
    "max_completion_tokens": 100, "n": 1, "user": "u-1", "temperature": 0.2}
bodies = [
    (P["/v1/chat/completions"], j(chat)),
    (P["/v1/chat/completions"], b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'),
    (P["/v1/chat/completions"], b'{"model":"gpt-4\\u006f","messages":[{"role":"user","content":"esc\\n\\u00e9"}],"functions":[{"name":"f"}],"function_call":"auto","safety_identifier":"s"}'),
    (P["/v1/completions"], b'{"model":"gpt-3.5-turbo-instruct","prompt":["a",[1,2,3],"b"],"best_of":2,"max_tokens":7}'),
    (P["/v1/completions"], b'{"model":"davinci-002","prompt":[[15496,11,995]]}'),
    (P["/v1/embeddings"], b'{"model":"text-embedding-3-small","input":["The food was delicious","and the waiter"],"encoding_format":"float"}'),
    (P["/v1/responses"], j({"model": "o4-mini", "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello"},
                                      {"type": "input_image", "image_url": "https://x/y.png"},
                                      {"type": "input_file", "file_id": "file-1"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "42"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thought"}]}],
        "max_output_tokens": 2048, "reasoning": {"effort": "low"}, "stream": True})),
    (P["/v1/responses"], b'{"model":"gpt-4.1","input":"Tell me a joke"}'),
    (P["/v1/moderations"], b'{"input":"I want to check this"}'),
    (P["/v1/images/generations"], b'{"model":"dall-e-3","prompt":"a cat","size":"1024x1024","quality":"hd","n":1}'),
    (P["/v1/audio/speech"], b'{"model":"tts-1","input":"Hello world","voice":"alloy"}'),
    (P["/v1/realtime/sessions"], b'{"model":"gpt-4o-realtime-preview","modalities":["audio","text"],"instructions":"hi"}'),
    (P["/v1/realtime/client_secrets"], b'{"session":{"type":"realtime","model":"gpt-realtime","instructions":"x"}}'),
    (P["azure"], b'{"messages":[{"role":"user","content":"hi"}],"model":"ignored"}'),
    (P["realtime_q"], b'{"session":{"model":"gpt-4o-realtime-preview"}}'),
    (P["/v1/chat/completions"], b'{"model":null,"messages":null,"stream":null,"stream_options":null,"max_tokens":null}'),
]
B = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
def form(fields, boundary=B):
    out = b""
    for name, filename, ct, data in fields:
        out += b"--" + boundary.encode() + b"\r\n"
        out += b'Content-Disposition: form-data; name="' + name.encode() + b'"'
        if filename:
            out += b'; filename="' + filename.encode() + b'"'
        out += b"\r\n"
        if ct:
            out += b"Content-Type: " + ct.encode() + b"\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"
forms = [
    (P["/v1/audio/transcriptions"], form([("file", "audio.wav", "audio/wav", b"RIFF\x00\x00\x00\x00WAVEfmt "),
        ("model", None, None, b"whisper-1"), ("prompt", None, None, b"Names: Zo\xc3\xab"),
        ("response_format", None, None, b"json"), ("stream", None, None, b"false")])),
    (P["/v1/audio/translations"], form([("model", None, None, b"whisper-1"), ("file", "a.mp3", "audio/mpeg", b"ID3")])),
    (P["/v1/images/edits"], form([("image", "a.png", "image/png", b"\x89PNG\r\n\x1a\n"),
        ("prompt", None, None, b"add a hat"), ("model", None, None, b"gpt-image-1"),
        ("n", None, None, b"2"), ("size", None, None, b"1024x1024"), ("quality", None, None, b"high"),
        ("user", None, None, b"u")])),
]
for path, body in bodies:
    put("request_view", bytes([0, path, 0, 0]) + body)
    put("request_view", bytes([0, path, 1, 1]) + body)
for path, body in forms:
    put("request_view", bytes([0, path, 2, 0]) + body)
    put("request_view", bytes([0, path, 3, 1]) + body.replace(B.encode(), b"X"))

for path, body in bodies:
    for flags in (0, 1, 3):
        put("rewrite", bytes([flags]) + struct.pack("<Q", 1000) + body)
put("rewrite", bytes([1]) + struct.pack("<Q", 0) + b'{"stream_\\u006fptions":{"include_\\u0075sage":false,"x":[1, 2]},"n":1.50}')
put("rewrite", bytes([3]) + struct.pack("<Q", 10) + b'{"max_tokens":20,"max_tokens":1e3,"stream_options":null,"max_output_tokens":-0}')

chat_sse = b"".join([
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi \\"usage\\":{"}}],"usage":null}\n\n',
    b': keep-alive\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":4}}}\n\n',
    b'data: [DONE]\n\n'])
resp_sse = b"".join([
    b'event: response.created\ndata: {"type":"response.created","response":{"id":"r1","status":"in_progress","usage":null}}\n\n',
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hel"}\n\n',
    b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r1","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"Hello"}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}}\n\n'])
crlf_sse = chat_sse.replace(b"\n", b"\r\n")
multi_line = b'data: {"choices":[],\ndata: "usage":{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]'
json_body = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"{\\"usage\\":1}"}}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}}'
emb_body = b'{"object":"list","data":[{"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}'
cuts = struct.pack("<HHHH", 5, 40, 41, 300)
for body in (chat_sse, resp_sse, crlf_sse, multi_line):
    put("sse_usage", bytes([0]) + cuts + body)
    put("sse_usage", bytes([4]) + cuts + body)
for body in (json_body, emb_body):
    put("sse_usage", bytes([1]) + cuts + body)
