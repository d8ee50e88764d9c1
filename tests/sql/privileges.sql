-- An application database whose owners, grants and settings a restore must give back (issue #26).
-- Roles are created by the test (they are per server); this file runs in the database, as a superuser.
-- Placeholders: :"db" is the database name.
CREATE COLLATION "Ünïcode Sort" (provider = builtin, locale = 'C.UTF-8');
CREATE SCHEMA "App Data" AUTHORIZATION "Data Owner";
CREATE SCHEMA billing AUTHORIZATION billing_owner;
CREATE TABLE "App Data"."Customers" (
    id bigserial PRIMARY KEY,
    name text COLLATE "Ünïcode Sort" NOT NULL,
    email text,
    secret_note text
);
ALTER TABLE "App Data"."Customers" OWNER TO "Data Owner";
ALTER SEQUENCE "App Data"."Customers_id_seq" OWNER TO "Data Owner";
INSERT INTO "App Data"."Customers" (name, email, secret_note)
SELECT 'customer ' || g, 'c' || g || '@example.com', 'note ' || g FROM generate_series(1, 50) g;
CREATE TABLE billing.invoices (id serial PRIMARY KEY, customer_id bigint, amount numeric(10, 2), tenant text DEFAULT current_user);
ALTER TABLE billing.invoices OWNER TO billing_owner;
INSERT INTO billing.invoices (customer_id, amount, tenant) SELECT g % 50 + 1, g * 1.5, 'app_login' FROM generate_series(1, 40) g;
ALTER TABLE billing.invoices ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.invoices FORCE ROW LEVEL SECURITY;  -- its owner too sees only what a policy lets it
CREATE POLICY tenant_rows ON billing.invoices TO app_login USING (tenant = current_user);
CREATE VIEW billing.invoice_totals AS SELECT customer_id, sum(amount) AS total FROM billing.invoices GROUP BY customer_id;
ALTER VIEW billing.invoice_totals OWNER TO billing_owner;
CREATE FUNCTION billing.total_for(bigint) RETURNS numeric LANGUAGE sql STABLE AS $$ SELECT sum(amount) FROM billing.invoices WHERE customer_id = $1 $$;
ALTER FUNCTION billing.total_for(bigint) OWNER TO billing_owner;
-- Grants to the application login: schema, table, column-level, sequence, function.
GRANT USAGE ON SCHEMA "App Data" TO app_login;
GRANT USAGE ON SCHEMA billing TO app_login;
GRANT SELECT, INSERT ON "App Data"."Customers" TO app_login;
GRANT SELECT (id, name), UPDATE (email) ON "App Data"."Customers" TO reporting;
GRANT USAGE, SELECT ON SEQUENCE "App Data"."Customers_id_seq" TO app_login;
GRANT SELECT, INSERT ON billing.invoices TO app_login;
GRANT SELECT ON billing.invoice_totals TO reporting;
REVOKE EXECUTE ON FUNCTION billing.total_for(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing.total_for(bigint) TO app_login;
-- Default privileges: what "Data Owner" creates later is readable by the application.
ALTER DEFAULT PRIVILEGES FOR ROLE "Data Owner" IN SCHEMA "App Data" GRANT SELECT ON TABLES TO app_login;
ALTER DEFAULT PRIVILEGES FOR ROLE billing_owner GRANT SELECT ON TABLES TO reporting;
COMMENT ON TABLE "App Data"."Customers" IS 'the customers, kept by the data team';
-- A large object owned by the application, readable by reporting.
SELECT lo_from_bytea(424242, 'a scanned contract');
ALTER LARGE OBJECT 424242 OWNER TO app_login;
GRANT SELECT ON LARGE OBJECT 424242 TO reporting;
-- Objects only a superuser can create.
CREATE FUNCTION public.pgdr_test_ddl_log() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN RAISE NOTICE 'ddl: %', tg_tag; END $$;
CREATE EVENT TRIGGER "Log DDL" ON ddl_command_end EXECUTE FUNCTION public.pgdr_test_ddl_log();
CREATE PUBLICATION everything FOR ALL TABLES;
CREATE PUBLICATION "App Schema" FOR TABLES IN SCHEMA "App Data";
-- The database's own properties.
ALTER DATABASE :"db" SET search_path TO "App Data", billing, public;
ALTER DATABASE :"db" SET statement_timeout TO '45s';
ALTER ROLE app_login IN DATABASE :"db" SET work_mem TO '8MB';
ALTER DATABASE :"db" CONNECTION LIMIT 77;
REVOKE CONNECT, TEMPORARY ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO app_login, reporting;
GRANT TEMPORARY ON DATABASE :"db" TO app_login;
COMMENT ON DATABASE :"db" IS 'the application''s database';
ALTER DATABASE :"db" OWNER TO "Data Owner";
-- A subscription (never restored: on a copy it would start replicating). Disabled, never connects.
CREATE SUBSCRIPTION "App Sub" CONNECTION 'host=127.0.0.1 port=1 dbname=nowhere' PUBLICATION everything
    WITH (connect = false, enabled = false, create_slot = false, slot_name = NONE);
