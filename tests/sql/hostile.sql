-- A database as unfriendly as real production schemas, for pgdr's round-trip tests.
-- Loaded with psql -v ON_ERROR_STOP=1 into an empty database by a superuser. The roles
-- pgdr_hostile_owner, "Reporting Role" and "Night\nShift" exist on this server only: the restore servers lack them.
CREATE EXTENSION citext;
CREATE EXTENSION hstore;

CREATE SCHEMA "Sales Dept";
CREATE SCHEMA "ünï 🎉";
CREATE SCHEMA "-dash";
CREATE SCHEMA "a.b";
CREATE SCHEMA a;
CREATE SCHEMA "order";
CREATE SCHEMA "%pct {x}:y";
CREATE SCHEMA "quote""s";

CREATE TYPE "Sales Dept"."Account Status" AS ENUM ('new', 'Active', 'on hold', 'closed ✓');
CREATE DOMAIN "Sales Dept".positive_amount AS numeric(12, 2) CHECK (VALUE >= 0);

-- Identity, generated, citext, hstore, enum and domain columns; quoted mixed-case names.
CREATE TABLE "Sales Dept"."Customer Accounts" (
    "Id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "E-Mail" citext NOT NULL UNIQUE,
    "Tags" hstore,
    "Status" "Sales Dept"."Account Status" NOT NULL DEFAULT 'new',
    "Balance" "Sales Dept".positive_amount NOT NULL,
    "Balance With Tax" numeric GENERATED ALWAYS AS ("Balance" * 1.2) STORED
);
INSERT INTO "Sales Dept"."Customer Accounts" ("E-Mail", "Tags", "Status", "Balance")
SELECT 'User' || g || '@Example.COM', hstore('tier', (g % 3)::text) || hstore('note', 'x "y" z'),
       (ARRAY['new', 'Active', 'on hold', 'closed ✓'])[1 + g % 4]::"Sales Dept"."Account Status", g * 1.25
FROM generate_series(1, 300) g;

-- A composite, deferrable foreign key between quoted tables.
CREATE TABLE "Sales Dept"."Orders" (
    region text NOT NULL,
    "Order No" int NOT NULL,
    "Customer" bigint NOT NULL REFERENCES "Sales Dept"."Customer Accounts" ("Id"),
    PRIMARY KEY (region, "Order No")
);
CREATE TABLE "Sales Dept"."OrderItems" (
    region text NOT NULL,
    "Order No" int NOT NULL,
    "Line" int NOT NULL,
    "Qty" int NOT NULL CHECK ("Qty" > 0),
    PRIMARY KEY (region, "Order No", "Line"),
    FOREIGN KEY (region, "Order No") REFERENCES "Sales Dept"."Orders" (region, "Order No") DEFERRABLE INITIALLY DEFERRED
);
INSERT INTO "Sales Dept"."Orders" SELECT (ARRAY['EU', 'US'])[1 + g % 2], g, 1 + g % 300 FROM generate_series(1, 500) g;
INSERT INTO "Sales Dept"."OrderItems" SELECT o.region, o."Order No", l, l FROM "Sales Dept"."Orders" o, generate_series(1, 3) l;

-- A partitioned table with quoted partitions.
CREATE TABLE "Sales Dept"."Events" (at timestamptz NOT NULL, "What" text) PARTITION BY RANGE (at);
CREATE TABLE "Sales Dept"."Events 2025" PARTITION OF "Sales Dept"."Events" FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE "Sales Dept"."Events 2026" PARTITION OF "Sales Dept"."Events" FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO "Sales Dept"."Events" SELECT timestamptz '2025-06-01' + g * interval '1 hour', 'e' || g FROM generate_series(1, 8000) g;

-- Two tables whose names would collide if schema and table were joined with a bare dot.
CREATE TABLE "a.b".c (v int);
CREATE TABLE a."b.c" (v int);
INSERT INTO "a.b".c SELECT generate_series(1, 3);
INSERT INTO a."b.c" SELECT generate_series(1, 5);

-- Reserved words, a leading dash, unicode and emoji, %, braces, colons, double quotes.
CREATE TABLE "order"."select" ("from" int PRIMARY KEY, "where" text);
INSERT INTO "order"."select" SELECT g, 'w' || g FROM generate_series(1, 40) g;
CREATE TABLE public."order" ("user" int PRIMARY KEY, "group" text);
INSERT INTO public."order" SELECT g, 'g' FROM generate_series(1, 7) g;
CREATE TABLE "-dash"."-table" ("-col" int PRIMARY KEY);
INSERT INTO "-dash"."-table" SELECT generate_series(1, 11);
CREATE TABLE "ünï 🎉"."tëst 🎉" ("naïve ☕" text PRIMARY KEY, "Größe" int);
INSERT INTO "ünï 🎉"."tëst 🎉" SELECT 'ü' || g, g FROM generate_series(1, 13) g;
CREATE TABLE "%pct {x}:y"."100% {done}:now" ("k:1" int PRIMARY KEY, "p%s" text, "{b}" text);
INSERT INTO "%pct {x}:y"."100% {done}:now" SELECT g, '%s', '{}' FROM generate_series(1, 17) g;
CREATE TABLE "quote""s"."ta""ble" ("co""l" int PRIMARY KEY);
INSERT INTO "quote""s"."ta""ble" SELECT generate_series(1, 19);
CREATE TABLE public."<script>alert(1)</script>" (id int PRIMARY KEY);
INSERT INTO public."<script>alert(1)</script>" VALUES (1), (2);
CREATE TABLE "Sales Dept"."Child Of Unicode" (
    "Ref" text REFERENCES "ünï 🎉"."tëst 🎉" ("naïve ☕"),
    n int
);
INSERT INTO "Sales Dept"."Child Of Unicode" SELECT 'ü' || (1 + g % 13), g FROM generate_series(1, 23) g;

-- No primary key, duplicate rows; an unlogged table.
CREATE TABLE public.no_pk (a int, b text);
INSERT INTO public.no_pk SELECT g % 5, 'dup' FROM generate_series(1, 50) g;
CREATE UNLOGGED TABLE public.unlogged_cache (k text PRIMARY KEY, v jsonb);
INSERT INTO public.unlogged_cache SELECT 'k' || g, jsonb_build_object('n', g, 'q', '"{%}"') FROM generate_series(1, 29) g;

-- A trigger that writes to another table (it must not fire again during a restore).
CREATE TABLE public.audit_log (id bigserial PRIMARY KEY, what text NOT NULL);
CREATE FUNCTION public.log_account() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.audit_log (what) VALUES ('account ' || NEW."E-Mail");
    RETURN NEW;
END $$;
CREATE TRIGGER "Log Account" AFTER INSERT ON "Sales Dept"."Customer Accounts" FOR EACH ROW EXECUTE FUNCTION public.log_account();
INSERT INTO "Sales Dept"."Customer Accounts" ("E-Mail", "Balance") VALUES ('late@example.com', 1);

-- A view and a materialized view.
CREATE VIEW "Sales Dept"."Active Accounts" AS SELECT * FROM "Sales Dept"."Customer Accounts" WHERE "Status" = 'Active';
CREATE MATERIALIZED VIEW "Sales Dept"."Totals By Region" AS SELECT region, count(*) AS n FROM "Sales Dept"."Orders" GROUP BY region;

-- A sequence near its maximum.
CREATE SEQUENCE public.near_max MAXVALUE 9223372036854775807 START 9223372036854775800;
SELECT nextval('public.near_max'), nextval('public.near_max');

-- Large objects.
SELECT lo_from_bytea(0, convert_to('first large object ✓', 'UTF8'));
SELECT lo_from_bytea(0, decode(repeat('00ff', 5000), 'hex'));

-- Objects owned by, and granted to, roles that the restore servers do not have.
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgdr_hostile_owner') THEN CREATE ROLE pgdr_hostile_owner; END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'Reporting Role') THEN CREATE ROLE "Reporting Role"; END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = E'Night\nShift') THEN CREATE ROLE "Night
Shift"; END IF;
END $$;
CREATE TABLE public.owned_elsewhere (id int PRIMARY KEY, note text);
INSERT INTO public.owned_elsewhere SELECT g, 'n' FROM generate_series(1, 31) g;
ALTER TABLE public.owned_elsewhere OWNER TO pgdr_hostile_owner;
GRANT SELECT ON "Sales Dept"."Customer Accounts" TO "Reporting Role";
GRANT USAGE ON SCHEMA "Sales Dept" TO "Reporting Role";
GRANT SELECT ON public.owned_elsewhere TO "Night
Shift";  -- a newline in a role's name: PostgreSQL accepts it
ANALYZE;
