-- tower-llm-policy: the key store (PostgresKeyStore).
--
-- One row per virtual key. The key itself is never stored: `digest` is its SHA-256 (32
-- bytes), what KeyAuth looks up. `policy` holds every policy field of the crate's ApiKey as
-- JSON (the field names of the configuration files), so that a new field needs no
-- migration; `name` is the key's id (unique), also its `name` in `policy`.
CREATE TABLE tlp_keys (
    name          text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    digest        bytea NOT NULL UNIQUE CHECK (octet_length(digest) = 32),
    policy        jsonb NOT NULL CHECK (jsonb_typeof(policy) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz
);

-- Every change of a key (its policy, or the key itself) is announced on the channel
-- `tlp_keys` with the key's digest in hexadecimal (the old and the new digest when it
-- changed): replicas that LISTEN drop it from their caches at once. A change of
-- `last_used_at` alone is not announced.
CREATE FUNCTION tlp_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.digest = NEW.digest AND OLD.policy = NEW.policy
       AND OLD.name = NEW.name THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('tlp_keys', encode(OLD.digest, 'hex'));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND (TG_OP = 'INSERT' OR OLD.digest <> NEW.digest) THEN
        PERFORM pg_notify('tlp_keys', encode(NEW.digest, 'hex'));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tlp_keys_notify
    AFTER INSERT OR UPDATE OR DELETE ON tlp_keys
    FOR EACH ROW EXECUTE FUNCTION tlp_keys_notify();
