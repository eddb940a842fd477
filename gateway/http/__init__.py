"""The data plane: HTTP/1.1 on asyncio protocols and httptools, both sides.

- `exchange`: one request (`Exchange`), the handler's decisions (`Respond`, `Forward`, `Consume`), how it
  ended (`Outcome`) and the `Handler` protocol the request path (gateway.app) implements;
- `framing`: pure HTTP/1.1 rules: request framing checks, status lines, response head filtering, the one
  hop-by-hop set;
- `deadlines`: one timer per event loop for every timeout of both connection types;
- `reader`, `answers`, `client`: a client connection: parsing requests, answering the exchange in flight,
  and the connection itself (order, flow control, deadlines, closing);
- `upstream`, `pool`: an upstream connection relaying one response at a time, and the keep-alive pool;
- `server_state`, `server`: what the connections of one listener share, and starting and draining it.
"""
