"""The victim: a FastAPI image-translation API with API keys, Redis rate limits and quotas, a query log,
a dynamically batching model host and the output-defense pipeline.

Entry points: :func:`victim_service.app.create_app` (an app from :class:`~victim_service.settings.Settings`),
:func:`victim_service.app.create_app_from_env` (the uvicorn factory), and
:func:`victim_service.process.start_service` (a real uvicorn subprocess for campaigns and tests).
"""
