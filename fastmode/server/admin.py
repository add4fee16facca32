"""Admin APIs behind admin keys: the usage report (with the speed dimension) and the cost report."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fastmode.platform import reports
from fastmode.server.errors import InvalidRequest
from fastmode.server.http import betas, endpoint
from fastmode.server.state import ServerState


async def _report(fn, *args) -> Response:
    try:
        return JSONResponse(await run_in_threadpool(fn, *args))
    except reports.ReportQueryError as e:
        raise InvalidRequest(str(e)) from None


async def usage_report(request: Request, state: ServerState) -> Response:
    p = state.platform
    return await _report(reports.usage_report, p.db, request.state.principal.org.id,
                         request.query_params.multi_items(), betas(request), p.clock())


async def cost_report(request: Request, state: ServerState) -> Response:
    p = state.platform
    return await _report(reports.cost_report, p.db, request.state.principal.org.id,
                         request.query_params.multi_items(), p.clock())


def routes() -> list[Route]:
    return [
        Route("/v1/organizations/usage_report/messages", endpoint(usage_report, admin=True), methods=["GET"]),
        Route("/v1/organizations/cost_report", endpoint(cost_report, admin=True), methods=["GET"]),
    ]
