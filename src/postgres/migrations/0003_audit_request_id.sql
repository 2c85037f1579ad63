-- tower-llm-policy: exactly-once audit writes (PostgresSink).
--
-- PostgresSink writes with `INSERT ... ON CONFLICT (request_id, ts) DO NOTHING`: a batch that
-- is written again (its commit's reply was lost with the connection, and the sink retried)
-- adds no row twice. The pair, not `request_id` alone: with `trust_request_id` the id is the
-- client's, and a client that reuses one for a later request still gets both recorded. Also
-- the index for finding a request's record by its `x-request-id`.
CREATE UNIQUE INDEX tlp_audit_request_id_ts ON tlp_audit (request_id, ts);
