"""`perito.v1.Perito` over gRPC, a door: each method hands its request to the inference service.

The tenant is the one `auth.TenantInterceptor` put in the call's context; errors, request ids
and call metrics are `errors.CallInterceptor`'s. The only translation this door does is the
call's deadline (`context.time_remaining()`) into the monotonic time `Classify` is due by.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from perito.v1 import classify_pb2, jobs_pb2, models_pb2, service_pb2_grpc
from perito_server.auth import current_tenant
from perito_server.inference import InferenceService

Context = grpc.aio.ServicerContext[Any, Any]


class PeritoServicer(service_pb2_grpc.PeritoServicer):
    """The `perito.v1.Perito` service's methods, each one call of `service`."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def Classify(
        self, request: classify_pb2.ClassifyRequest, context: Context
    ) -> classify_pb2.ClassifyResponse:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self.service.classify(request, current_tenant(), deadline)

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: Context) -> jobs_pb2.Job:
        return await self.service.submit_job(request, current_tenant())

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Context) -> jobs_pb2.Job:
        return await self.service.get_job(request.job_id, current_tenant())

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: Context
    ) -> jobs_pb2.ListJobsResponse:
        return await self.service.list_jobs(request, current_tenant())

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[jobs_pb2.Job]:
        async for job in self.service.watch_job(request.job_id, current_tenant()):
            yield job

    async def ListJobResults(
        self, request: jobs_pb2.ListJobResultsRequest, context: Context
    ) -> jobs_pb2.ListJobResultsResponse:
        return await self.service.list_job_results(request, current_tenant())

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Context) -> jobs_pb2.Job:
        return await self.service.cancel_job(request.job_id, current_tenant())

    async def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: Context
    ) -> jobs_pb2.DeleteJobResponse:
        await self.service.delete_job(request.job_id, current_tenant())
        return jobs_pb2.DeleteJobResponse()

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        return await self.service.list_models(request, current_tenant())

    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: Context
    ) -> models_pb2.Model:
        return await self.service.get_model(request.model)
