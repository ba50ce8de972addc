-- Release one stream lease (gone already: nothing to do).
-- KEYS[1] the tenant's stream leases   ARGV[1] lease id
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
