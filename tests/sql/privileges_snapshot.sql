-- What an application can tell about a database besides its rows: owners and ACLs of every object
-- (as aclexplode rows), default privileges, policies and row-level security, event triggers, publications, large
-- objects.
SELECT kind, name, owner, acl FROM (
  SELECT 'relation' AS kind, format('%I.%I', n.nspname, c.relname) AS name, pg_get_userbyid(c.relowner) AS owner,
         (SELECT string_agg(format('%s>%s:%s%s', pg_get_userbyid(a.grantor), CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, CASE WHEN a.is_grantable THEN '*' ELSE '' END), ',' ORDER BY 1) FROM aclexplode(c.relacl) a) AS acl
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  UNION ALL
  SELECT 'column', format('%I.%I.%I', n.nspname, c.relname, a.attname), NULL,
         (SELECT string_agg(format('%s>%s:%s', pg_get_userbyid(x.grantor), pg_get_userbyid(x.grantee), x.privilege_type), ',' ORDER BY 1) FROM aclexplode(a.attacl) x)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE a.attacl IS NOT NULL
  UNION ALL
  SELECT 'schema', format('%I', nspname), pg_get_userbyid(nspowner),
         (SELECT string_agg(format('%s>%s:%s', pg_get_userbyid(a.grantor), CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type), ',' ORDER BY 1) FROM aclexplode(nspacl) a)
  FROM pg_namespace WHERE nspname NOT LIKE 'pg\_%' AND nspname <> 'information_schema'
  UNION ALL
  SELECT 'function', p.oid::regprocedure::text, pg_get_userbyid(p.proowner),
         (SELECT string_agg(format('%s>%s:%s', pg_get_userbyid(a.grantor), CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type), ',' ORDER BY 1) FROM aclexplode(p.proacl) a)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL
  SELECT 'collation', format('%I.%I', n.nspname, collname), pg_get_userbyid(collowner), NULL
  FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL
  SELECT 'default acl', format('%s in %s for %s', pg_get_userbyid(defaclrole), coalesce(n.nspname, '*'), defaclobjtype), NULL, defaclacl::text
  FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
  UNION ALL
  SELECT 'policy', format('%s on %s', polname, polrelid::regclass), NULL,
         (SELECT string_agg(CASE r WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(r) END, ',' ORDER BY 1) FROM unnest(polroles) r)
  FROM pg_policy
  UNION ALL
  SELECT 'row security', format('%I.%I', n.nspname, c.relname), NULL,
         format('enabled %s, forced %s', c.relrowsecurity, c.relforcerowsecurity)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relrowsecurity OR c.relforcerowsecurity
  UNION ALL
  SELECT 'event trigger', evtname, pg_get_userbyid(evtowner), evtevent || ' ' || evtenabled::text FROM pg_event_trigger
  UNION ALL
  SELECT 'publication', pubname, pg_get_userbyid(pubowner), puballtables::text FROM pg_publication
  UNION ALL
  SELECT 'large object', oid::text, pg_get_userbyid(lomowner), lomacl::text FROM pg_largeobject_metadata
  UNION ALL
  SELECT 'comment', format('%s %s', classoid::regclass, objoid::regclass), NULL, description FROM pg_description WHERE classoid = 'pg_class'::regclass
) everything ORDER BY 1, 2;
