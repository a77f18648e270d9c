"""KPIs in production: a KPI file's thresholds as live checks (`live.py`, watched by `serve --kpi`) and as
Prometheus recording and alerting rules (`rules.py`, `optcli kpi rules`). The file itself is read and
validated by `optcli.bench.kpi.load_kpi`; this room takes the validated model and needs nothing above it."""
