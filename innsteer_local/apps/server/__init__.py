"""An OpenAI-compatible HTTP server whose every request picks its own steering.

    innsteer-local serve --flow honesty=honesty.gguf --port 8080

Endpoints: `/v1/chat/completions`, `/v1/completions` (both stream by SSE), `/v1/models`,
`GET /v1/steering` (the loaded flows), `POST /v1/steering` (load one more from the operator's
`--flows-dir`) and `DELETE /v1/steering/NAME` (unload one loaded so), and a playground page at
`/`. Access rules (API key, Host, Origin, body type and size) are guard.py's. A request's
`steering` field, `[{"flow": NAME, "strength": A, "gate": "off"}]`, applies to that request only;
an empty list is unsteered. Without the field, the model id says
the steering (`smollm2-135m+honesty@2`, grammar in model_ids.py), so any OpenAI-compatible chat
app can steer by picking a model.

Concurrency: requests are sequences of one batched engine (runtime/engine.py): up to --parallel
of them are decoded together in every llama_decode (continuous batching: a request joins and leaves
between steps), and each sequence's rows are steered by that request's flows only, in the same
batch as requests with other steering or none. Requests beyond --parallel wait in a bounded queue
(429 with Retry-After when it is full). The event loop never waits on generation; a client that disconnects,
streaming or not, frees its sequence at the next step. A finished request's KV cells stay with its
sequence, and a later request with exactly the same steering starts on the free sequence holding
the longest prefix of its prompt (a chat's history): only the rest is evaluated
(`usage.prompt_tokens_details.cached_tokens`). Cells computed under other steering are never reused. Each response
carries `steering_stats` counted for its own sequence alone.

FastAPI and uvicorn are imported only when the app is made or run (the `[serve]` extra). The
package: requests.py (parsing), state.py (flows, presets, the engine), app.py (HTTP, serving).
"""

from .app import PLAYGROUND, _require_fastapi, create_app, default_parallel, model_id_for, serve, server_config, serving
from .requests import (MAX_JSON_DEPTH, MAX_STRENGTH, RequestError, SteeringChoice, json_depth, parse_body,
                       parse_steering, sampling_params, strength_value)
from .state import API_FLOW_LIMIT, Engine, LoadedFlow, request_stats

__all__ = ["API_FLOW_LIMIT", "Engine", "LoadedFlow", "MAX_JSON_DEPTH", "MAX_STRENGTH", "PLAYGROUND", "RequestError",
           "SteeringChoice", "create_app", "default_parallel", "json_depth", "model_id_for", "parse_body",
           "parse_steering", "request_stats", "sampling_params", "serve", "server_config", "serving", "strength_value",
           "_require_fastapi"]
