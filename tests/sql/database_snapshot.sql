-- A database's own properties, read from any database of the server; the parameter "name" is its name (a psycopg query: literal percent signs are doubled).
SELECT pg_get_userbyid(d.datdba) AS owner, pg_encoding_to_char(d.encoding) AS encoding, d.datcollate, d.datctype,
       d.datlocprovider, d.datlocale, d.datconnlimit, shobj_description(d.oid, 'pg_database') AS comment,
       (SELECT string_agg(format('%%s>%%s:%%s', pg_get_userbyid(a.grantor), CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type), ',' ORDER BY 1) FROM aclexplode(d.datacl) a) AS acl,
       (SELECT string_agg(format('%%s:%%s', CASE s.setrole WHEN 0 THEN '*' ELSE pg_get_userbyid(s.setrole) END, array_to_string(s.setconfig, ';')), ' | ' ORDER BY 1)
          FROM pg_db_role_setting s WHERE s.setdatabase = d.oid) AS settings
FROM pg_database d WHERE d.datname = %(name)s
