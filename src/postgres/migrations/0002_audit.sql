-- tower-llm-policy: the audit log (PostgresSink).
--
-- One row per request, allowed or refused. The columns are the fields a query filters or
-- sums on; `record` is the whole audit record as JSON (the same object as a JSON Lines log).
CREATE TABLE tlp_audit (
    id                 bigserial PRIMARY KEY,
    ts                 timestamptz NOT NULL,
    request_id         text NOT NULL,
    key                text,
    model              text,
    endpoint           text NOT NULL,
    status             integer,
    outcome            text NOT NULL,
    blocked_by         text,
    code               text,
    prompt_tokens      bigint,
    completion_tokens  bigint,
    cost_usd           double precision,
    record             jsonb NOT NULL
);

-- Per key over time (spend per key per day), and over time alone.
CREATE INDEX tlp_audit_key_ts ON tlp_audit (key, ts);
CREATE INDEX tlp_audit_ts ON tlp_audit (ts);
