"""Monitoring assets `+mode=deploy` writes beside the serve config: Prometheus alerting rules
(a template rendered from conf/ values), a scrape config for Ray's metrics endpoint, and
Grafana dashboards. Ray prefixes every custom metric with `ray_` on its endpoint."""
