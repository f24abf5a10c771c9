"""The application factory: a Flask app over the process's services, errors as problem+json."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, Response, request
from werkzeug.middleware.proxy_fix import ProxyFix

from auth.http import bp as auth_bp
from common.headers import header_value
from ingest.http import bp as ingest_bp
from mercure.http import bp as mercure_bp
from runtime.services import Services
from streaming.http import bp as streaming_bp
from web.cors import install_cors
from web.dashboard import bp as dashboard_bp
from web.fast import FastRoutes
from web.http import check_query_params, install_error_handlers
from web.ops import bp as ops_bp
from web.requestlog import install_request_log

ROOT = Path(__file__).resolve().parent.parent  # static/ (sluice.js, the dashboard) lives here


def create_app(services: Services) -> Flask:
    """Blueprints over the services, with CORS, the request log, the query-parameter cap and
    the forwarded client address installed as the settings ask."""
    app = Flask("sluice", root_path=str(ROOT))  # serves /static/* from ROOT/static
    app.extensions["sluice"] = services
    app.register_blueprint(ingest_bp)
    app.register_blueprint(auth_bp)
    app.register_blueprint(streaming_bp)
    app.register_blueprint(mercure_bp)
    app.register_blueprint(ops_bp)
    app.register_blueprint(dashboard_bp)
    install_error_handlers(app)
    install_cors(app, services.settings.cors_origins)
    if services.settings.request_log:
        install_request_log(app)
    max_params = services.settings.max_query_params

    @app.before_request
    def _limit_query() -> None:
        check_query_params(request, max_params)

    app.wsgi_app = FastRoutes(app.wsgi_app, services)  # type: ignore[method-assign]
    if services.settings.proxy_hops:  # behind Heroku's router: the client is in X-Forwarded-For
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=services.settings.proxy_hops)  # type: ignore[method-assign]

    @app.after_request
    def _close_when_draining(response: Response) -> Response:
        if services.draining:
            response.headers["Connection"] = "close"  # do not keep a stopping process busy
        return response

    @app.after_request
    def _encodable_headers(response: Response) -> Response:
        """A header the server cannot encode would fail the response after its stream had
        registered (a door's own headers are encoded where they are made; this is the net)."""
        for name, value in response.headers.items():
            if not value.isascii():
                response.headers[name] = header_value(value)
        return response

    @app.after_request
    def _count(response: Response) -> Response:
        rule = request.url_rule
        services.metrics.count_response(rule.rule if rule else "unmatched", response.status_code)
        return response

    return app
