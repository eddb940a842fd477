-- A deployment-wide change sequence, so that no change is lost across a gap in a gateway's LISTEN
-- connection. Every change notification bumps it inside the changing transaction; the row lock makes
-- the bumps commit in order, so `seq` counts the committed changes and a snapshot that sees seq = N sees
-- every change numbered up to N and none after. Gateways record the value their store read saw with each
-- cached entry (also in Redis); on every (re)connection of their LISTEN connection they read it again and
-- re-validate every cached entry that saw fewer changes (one indexed query each, no argon2).
CREATE TABLE credgate_changes (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    seq      bigint NOT NULL
);
INSERT INTO credgate_changes (only_row, seq) VALUES (true, 0);

-- Payload: {"t": "c"|"p"|"all", "id": ..., "ts": <epoch seconds at change>, "seq": <the change's number>}
CREATE OR REPLACE FUNCTION credgate_notify(kind text, ident text) RETURNS void LANGUAGE sql AS $$
    WITH bumped AS (UPDATE credgate_changes SET seq = seq + 1 RETURNING seq)
    SELECT pg_notify('credgate_auth', json_build_object(
        't', kind, 'id', ident, 'ts', extract(epoch FROM clock_timestamp()),
        'seq', (SELECT seq FROM bumped))::text);
$$;
