"""What a reload's log line says changed (supervisor.what_changed, pure)."""
from fastlb import config
from fastlb.supervisor import what_changed


def services(text):
    return {s.name: s for s in config.loads(text, resolve=False).services}


A = '''
[[service]]
name = "web"
listen = ["127.0.0.1:8080"]
backends = [ { address = "10.0.0.1:80" }, { address = "10.0.0.2:80" } ]
[[service]]
name = "db"
listen = ["127.0.0.1:5432"]
backends = [ { address = "10.0.1.1:5432" } ]
'''


def test_nothing_changed():
    assert what_changed(services(A), services(A)) == "nothing changed"


def test_added_removed_and_changed_services_and_backends():
    b = A.replace('{ address = "10.0.0.2:80" }', '{ address = "10.0.0.3:80" }')
    b = b.replace('name = "db"', 'name = "cache"').replace("5432", "6379")
    b += '[[service]]\nname = "api"\nlisten = ["127.0.0.1:9000"]\nretries = 0\nbackends = []\n'
    words = what_changed(services(A), services(b))
    assert words == ("added api, cache; removed db; "
                     "changed web (+10.0.0.3:80, -10.0.0.2:80)")


def test_a_setting_change_is_named_as_such():
    b = A.replace('name = "db"', 'name = "db"\nretries = 0')
    assert what_changed(services(A), services(b)) == "changed db (settings)"
