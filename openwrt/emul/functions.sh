# Stand-in for OpenWrt's /lib/functions.sh (package/base-files/files/lib/functions.sh), enough for
# a package's postinst/prerm: default_postinst / default_prerm with the stock semantics for an
# offline root (IPKG_INSTROOT set, as in an image build) and for a live system. Not shipped.
#   default_postinst: Require-User is not handled (the package declares none); source
#     <pkg>.postinst-pkg in a subshell; for every /etc/init.d/* in <pkg>.list: enable unless
#     PKG_UPGRADE=1, and start only on a live system.
#   default_prerm: source <pkg>.prerm-pkg; for every init script: disable unless PKG_UPGRADE=1, stop.
# enable/disable do what /etc/rc.common does: S${START}<name> / K${STOP}<name> links in /etc/rc.d.

_standin_rc() { # <action> <init script path inside root>
	local root="${IPKG_INSTROOT}" script="$2" name start stop
	name="${script##*/}"
	start="$(sed -n 's/^START=\([0-9][0-9]*\).*/\1/p' "$root$script")"
	stop="$(sed -n 's/^STOP=\([0-9][0-9]*\).*/\1/p' "$root$script")"
	case "$1" in
	enable)
		[ -n "$start$stop" ] || { echo "$script: no START or STOP" >&2; return 1; }
		mkdir -p "$root/etc/rc.d"
		[ -n "$start" ] && ln -sf "../init.d/$name" "$root/etc/rc.d/S${start}${name}"
		[ -n "$stop" ] && ln -sf "../init.d/$name" "$root/etc/rc.d/K${stop}${name}"
		return 0 ;;
	disable)
		rm -f "$root/etc/rc.d/S"??"$name" "$root/etc/rc.d/K"??"$name"
		return 0 ;;
	start|stop)
		# a live system would run "$script $1"; there is no procd in the emulated root
		echo "$script $1" >>"$root/tmp/.standin-rc.log"
		return 0 ;;
	esac
}

default_postinst() {
	local root="${IPKG_INSTROOT}" pkgname ret=0 i
	pkgname="$(basename "${1%.*}")"
	local info="$root/usr/lib/opkg/info"
	[ -f "$info/$pkgname.list" ] || { echo "default_postinst: no $info/$pkgname.list" >&2; return 1; }
	if [ -f "$info/$pkgname.postinst-pkg" ]; then
		( . "$info/$pkgname.postinst-pkg" )
		ret=$?
	fi
	for i in $(grep -s "^/etc/init.d/" "$info/$pkgname.list"); do
		if [ -n "$root" ]; then
			_standin_rc enable "$i" || ret=1
		else
			[ "$PKG_UPGRADE" = 1 ] || _standin_rc enable "$i" || ret=1
			_standin_rc start "$i"
		fi
	done
	return $ret
}

default_prerm() {
	local root="${IPKG_INSTROOT}" pkgname ret=0 i
	pkgname="$(basename "${1%.*}")"
	local info="$root/usr/lib/opkg/info"
	if [ -f "$info/$pkgname.prerm-pkg" ]; then
		( . "$info/$pkgname.prerm-pkg" )
		ret=$?
	fi
	for i in $(grep -s "^/etc/init.d/" "$info/$pkgname.list"); do
		[ "$PKG_UPGRADE" = 1 ] || _standin_rc disable "$i"
		[ -n "$root" ] || _standin_rc stop "$i"
	done
	return $ret
}
