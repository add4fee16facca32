"""Admin APIs behind admin keys: the usage report (with the speed dimension) and the cost report."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fastmode.platform import reports
from fastmode.server.http import betas, endpoint
from fastmode.server.state import ServerState


async def usage_report(request: Request, state: ServerState) -> Response:
    p = state.platform
    return JSONResponse(await run_in_threadpool(reports.usage_report, p.db, request.state.principal.org.id,
                                                request.query_params.multi_items(), betas(request), p.clock()))


async def cost_report(request: Request, state: ServerState) -> Response:
    p = state.platform
    return JSONResponse(await run_in_threadpool(reports.cost_report, p.db, request.state.principal.org.id,
                                                request.query_params.multi_items(), p.clock()))


def routes() -> list[Route]:
    return [
        Route("/v1/organizations/usage_report/messages", endpoint(usage_report, admin=True), methods=["GET"]),
        Route("/v1/organizations/cost_report", endpoint(cost_report, admin=True), methods=["GET"]),
    ]
