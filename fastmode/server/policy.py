"""Per-model request rules from the catalog: accepted thinking, effort and sampling parameters,
data residency, and which speed and service tier a request runs at (the fast-mode lifecycle)."""
from __future__ import annotations

from fastmode.platform.accounts import Organization
from fastmode.platform.catalog import FAST_BETA, FastMode, ModelEntry
from fastmode.server.errors import InvalidRequest, PermissionDenied
from fastmode.server.validate import MessagesRequest

# What output_config.effort does on a local model that has no thinking mode: an instruction
# added to the system prompt (the token counts include it). "high" is the default: no change.
EFFORT_INSTRUCTIONS = {
    "low": "Answer as briefly as possible.",
    "medium": "Keep the answer concise.",
    "xhigh": "Be thorough: cover every relevant detail.",
    "max": "Be as thorough and complete as you can.",
}
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": None}


def check_model_params(req: MessagesRequest, entry: ModelEntry) -> None:
    """400 for parameters this model does not accept."""
    if req.thinking is not None:
        kind = req.thinking["type"]
        if kind not in entry.thinking_types:
            hint = ""
            if kind == "enabled" and "adaptive" in entry.thinking_types:
                hint = (" `budget_tokens` is not supported on this model: use thinking: {\"type\": \"adaptive\"} "
                        "and set output_config.effort instead.")
            raise InvalidRequest(f"thinking.type: {kind!r} is not supported for model {req.model} "
                                 f"(accepted: {', '.join(entry.thinking_types) or 'none'}).{hint}")
    if req.effort is not None and req.effort not in entry.effort_levels:
        accepted = ", ".join(entry.effort_levels)
        raise InvalidRequest(f"output_config.effort: {req.effort!r} is not supported for model {req.model}"
                             + (f" (accepted: {accepted})" if accepted else " (this model takes no effort setting)"))
    if not entry.sampling_params:
        for name, default in _SAMPLING_DEFAULTS.items():
            value = getattr(req, name)
            if value is not None and value != default:
                raise InvalidRequest(f"{name}: model {req.model} does not accept a non-default {name}; remove "
                                     f"temperature, top_p and top_k (steer the output through the prompt)")
    if req.inference_geo is not None and req.inference_geo not in entry.inference_geos:
        raise InvalidRequest(f"inference_geo: {req.inference_geo!r} is not available for model {req.model} "
                             f"(one of {', '.join(entry.inference_geos) or 'none'})")
    limit = entry.max_output_tokens
    if limit is not None and req.max_tokens > limit:
        raise InvalidRequest(f"max_tokens: {req.max_tokens} > {limit}, which is the maximum allowed number of "
                             f"output tokens for {req.model}")


def resolve_speed(req: MessagesRequest, entry: ModelEntry, org: Organization, betas: set[str], now: float,
                  *, batch: bool = False) -> str:
    """The speed that runs at Unix time `now`: 'fast' or 'standard' (the deprecated fallback), or a 4xx."""
    if req.speed != "fast":
        return "standard"
    if batch:
        raise InvalidRequest("speed: fast mode is not available for the Message Batches API; remove `speed` "
                             "or send the request to /v1/messages")
    if req.service_tier == "priority":
        raise InvalidRequest("service_tier: fast mode is not available with the Priority Tier; send "
                             "speed \"fast\" without service_tier \"priority\", or drop `speed`")
    if entry.fast_mode is FastMode.DEPRECATED_FALLBACK:
        return "standard"  # silently, at standard price; usage.speed says so
    rejection = entry.fast_rejection(now, req.model)
    if rejection:
        raise InvalidRequest(rejection)
    if entry.fast_mode in (FastMode.PREVIEW, FastMode.DEPRECATED) and FAST_BETA not in betas:
        removal = f" (removal on {entry.fast_mode_removed_at})" if entry.fast_mode_removed_at else ""
        status = "is in research preview" if entry.fast_mode is FastMode.PREVIEW else "is deprecated" + removal
        raise InvalidRequest(f"speed: fast mode for {req.model} {status} and requires the beta "
                             f"header `anthropic-beta: {FAST_BETA}`")
    if not org.fast_mode:
        raise PermissionDenied("Fast mode is not enabled for your organization. Ask the server's operator to "
                               "enroll it (fastmode accounts org set ORG --fast-mode on).")
    return "fast"


def resolve_service_tier(req: MessagesRequest, org: Organization, speed: str) -> str:
    """'priority' for a Priority Tier organization's standard-speed requests (unless it asked for
    standard_only), else 'standard'. An explicit 'priority' from an organization without it is a 403."""
    if req.service_tier == "priority" and not org.priority_tier:
        raise PermissionDenied("service_tier: your organization has no Priority Tier commitment")
    if speed == "fast" or req.service_tier == "standard_only" or not org.priority_tier:
        return "standard"
    return "priority"


def effort_instruction(req: MessagesRequest) -> str | None:
    return EFFORT_INSTRUCTIONS.get(req.effort or "high")
