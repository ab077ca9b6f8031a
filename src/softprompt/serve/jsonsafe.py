"""JSON answers that never carry NaN or infinity.

JSON has no NaN: Python's ``json`` writes the invalid token ``NaN`` by default, and a
response class that refuses it raises mid-response (a 500).  The engine already refuses
non-finite results (:class:`~softprompt.serve.spec.NonFiniteResultError`); these are the last
line: a body that would hold one becomes a clean 422 ``non_finite_result`` error, and a
stream event becomes an error event.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

NON_FINITE = {"error": {"code": "non_finite_result", "type": "invalid_request_error",
                        "message": "the answer holds NaN or infinite numbers, which JSON cannot carry"}}


class FiniteJSONResponse(JSONResponse):
    """A JSONResponse whose body is a 422 error instead of a crash when the content is not finite."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # "Out of range float values are not JSON compliant"
            self.status_code = 422
            return super().render(NON_FINITE)


def dumps_finite(obj: Any) -> str:
    """``json.dumps(obj)``, or the non-finite error body when ``obj`` holds NaN or infinity."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        return json.dumps(NON_FINITE)
