"""uvicorn's HTTP/1.1 protocol with OpenAI-shaped answers for requests its parser refuses.

A request h11 cannot parse (`Content-Length: abc`, a malformed request line) never reaches the
app, so uvicorn answers it itself, as plain text. This subclass gives it the same body as every
other error of the server: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class OpenAIErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": {"message": f"malformed HTTP request: {msg}", "type": "invalid_request_error",
                                     "param": None, "code": "malformed_request"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
